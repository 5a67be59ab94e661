"""Handler modules shipped with calhook, one per concern; list them in CALHOOK_HANDLER_MODULES."""
