"""SCSI numbers (SAM-5, SPC-5, SBC-4): opcodes, service actions, status, sense keys, ASC/ASCQ."""

from __future__ import annotations

import enum


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    VARIABLE_LENGTH = 0x7F
    UNMAP = 0x42
    SANITIZE = 0x48
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    READ_16 = 0x88
    WRITE_16 = 0x8A
    COMPARE_AND_WRITE = 0x89
    ORWRITE_16 = 0x8B
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


class ServiceActionIn16(enum.IntEnum):
    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class VariableLength(enum.IntEnum):
    """Service actions of the 32-byte CDBs (opcode 7Fh, bytes 8..9)."""

    READ_32 = 0x0009
    VERIFY_32 = 0x000A
    WRITE_32 = 0x000B
    WRITE_AND_VERIFY_32 = 0x000C
    WRITE_SAME_32 = 0x000D


class MaintenanceIn(enum.IntEnum):
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C


class Status(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


class Asc(enum.IntEnum):
    """Additional sense code and qualifier as one 16-bit value: ``ASC << 8 | ASCQ``."""

    NO_ADDITIONAL_SENSE = 0x0000
    LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS = 0x041B
    WRITE_ERROR = 0x0C00
    UNRECOVERED_READ_ERROR = 0x1100
    MISCOMPARE_DURING_VERIFY = 0x1D00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    LOGICAL_UNIT_NOT_SUPPORTED = 0x2500
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604
    #: Third-party copy (EXTENDED COPY parameter lists and copy targets).
    INLINE_DATA_LENGTH_EXCEEDED = 0x2605
    TOO_MANY_TARGET_DESCRIPTORS = 0x2606
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = 0x2607
    TOO_MANY_SEGMENT_DESCRIPTORS = 0x2608
    UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = 0x2609
    COPY_TARGET_DEVICE_NOT_REACHABLE = 0x0D02
    OPERATION_IN_PROGRESS = 0x0016
    RESERVATIONS_PREEMPTED = 0x2A03
    RESERVATIONS_RELEASED = 0x2A04
    REGISTRATIONS_PREEMPTED = 0x2A05
    POWER_ON_RESET = 0x2900
    #: RFC 7143 §11.4.7.2 iSCSI conditions (ABORTED COMMAND).
    UNEXPECTED_UNSOLICITED_DATA = 0x0C0C
    NOT_ENOUGH_UNSOLICITED_DATA = 0x0C0D
    DATA_PHASE_ERROR = 0x4B00
    DATA_OFFSET_ERROR = 0x4B05
    POWER_ON_OCCURRED = 0x2901
    SCSI_BUS_RESET_OCCURRED = 0x2902
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = 0x2903
    I_T_NEXUS_LOSS_OCCURRED = 0x2907
    SANITIZE_COMMAND_FAILED = 0x3103
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    WRITE_PROTECTED = 0x2700
    MEDIUM_NOT_PRESENT = 0x3A00
    MEDIUM_REMOVAL_PREVENTED = 0x5302
    MODE_PARAMETERS_CHANGED = 0x2A01
    INTERNAL_TARGET_FAILURE = 0x4400
    INVALID_FIELD_IN_INFORMATION_UNIT = 0x0E03
    #: Protection information checks (ABORTED COMMAND), FORMAT UNIT.
    LOGICAL_BLOCK_GUARD_CHECK_FAILED = 0x1001
    LOGICAL_BLOCK_APPLICATION_TAG_CHECK_FAILED = 0x1002
    LOGICAL_BLOCK_REFERENCE_TAG_CHECK_FAILED = 0x1003
    FORMAT_COMMAND_FAILED = 0x3101
    CAPACITY_DATA_HAS_CHANGED = 0x2A09

    @property
    def asc(self) -> int:
        return self.value >> 8

    @property
    def ascq(self) -> int:
        return self.value & 0xFF


class VersionDescriptor(enum.IntEnum):
    """Standard INQUIRY version descriptors (SPC-5 table 'Version descriptor values')."""

    SAM_5 = 0x00A0
    SPC_4 = 0x0460
    SPC_5 = 0x05C0
    SBC_3 = 0x04C0
    SBC_4 = 0x0600
    ISCSI = 0x0960


class VpdPage(enum.IntEnum):
    SUPPORTED_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    EXTENDED_INQUIRY = 0x86
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


class ModePage(enum.IntEnum):
    CACHING = 0x08
    CONTROL = 0x0A
    ALL_PAGES = 0x3F


class PageControl(enum.IntEnum):
    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


#: Payload bytes moved per backstore call and per pool allocation (here, not in lu.py, so the
#: command modules lu.py imports can use it without a circular import).
IO_WINDOW = 1024 * 1024


def io_window(block_size: int) -> int:
    """``IO_WINDOW`` rounded down to whole blocks, at least one block."""
    return max(block_size, IO_WINDOW - IO_WINDOW % block_size)


#: Largest physical block size a LUN may report (``physical_block_size=``, READ CAPACITY(16)
#: LBPPBE); the CLI checks it too. QEMU and LIO stay well below what the 4-bit field allows.
MAX_PHYSICAL_BLOCK_SIZE = 64 * 1024

#: Peripheral device type of a direct-access block device (SBC).
DEVICE_TYPE_DISK = 0x00
#: INQUIRY byte 0 for a LUN that does not exist: qualifier 3, type 0x1F.
PERIPHERAL_NOT_CONNECTED = 0x7F
