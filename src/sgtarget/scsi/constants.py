"""SCSI numbers (SAM-5, SPC-5, SBC-4): opcodes, service actions, status, sense keys, ASC/ASCQ."""

from __future__ import annotations

import enum


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    WRITE_16 = 0x8A
    COMPARE_AND_WRITE = 0x89
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
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
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    INTERNAL_TARGET_FAILURE = 0x4400
    INVALID_FIELD_IN_INFORMATION_UNIT = 0x0E03

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


#: Peripheral device type of a direct-access block device (SBC).
DEVICE_TYPE_DISK = 0x00
#: INQUIRY byte 0 for a LUN that does not exist: qualifier 3, type 0x1F.
PERIPHERAL_NOT_CONNECTED = 0x7F
