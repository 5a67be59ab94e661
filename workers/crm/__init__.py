"""Keeping a CRM current from Calenso: the contact mapping, the client interface and adapters."""
