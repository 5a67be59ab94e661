"""Handler modules shipped with calhook, one per concern; every worker loads them (each handler
runs where its service is configured); ``CALHOOK_HANDLER_MODULES=-crm`` switches one off."""
