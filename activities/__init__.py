"""Activities: every piece of I/O the workflows need (files, notifications, clock)."""
