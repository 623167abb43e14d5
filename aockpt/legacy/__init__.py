"""Legacy torchao (0.7-0.17) records: inert stand-ins for deleted classes (`standins`) and their migration
(`migrate`) into torchao 0.18 tensors."""

from .migrate import MIGRATIONS, Migration, describe, is_legacy, migrate, migrate_state_dict
from .standins import LEGACY_GLOBALS, STAND_INS, LegacyFunction, LegacyObject, LegacyTensor, Role

__all__ = ["MIGRATIONS", "Migration", "describe", "is_legacy", "migrate", "migrate_state_dict", "LEGACY_GLOBALS",
           "STAND_INS", "LegacyFunction", "LegacyObject", "LegacyTensor", "Role"]
