"""Storage behind a LUN, registered by kind name."""
