"""Storage behind a LUN, registered by kind name."""

# Imported for their @register side effect: ``import sgtarget.backstores`` makes every kind
# available to ``base.create``.
from sgtarget.backstores import file, null, ram

__all__ = ["file", "null", "ram"]
