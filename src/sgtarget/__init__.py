"""sgtarget: a user-space SCSI target with a scatter-gather, budgeted, zero-copy data path."""

__version__ = "0.1.0"
