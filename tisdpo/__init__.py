"""tisdpo."""
