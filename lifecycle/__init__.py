"""Container lifecycle controller (see issue: lifecycle)."""
