"""SCSI semantics without transport: CDB decoding, SPC/SBC emulation, sense data."""
