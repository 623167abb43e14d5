"""Legacy torchao (0.7-0.17) records: inert stand-ins for deleted classes and their migration."""

from __future__ import annotations

# Old fully-qualified global name -> inert stand-in class registered under that name for unpickling.
STAND_INS: dict[str, type] = {}
