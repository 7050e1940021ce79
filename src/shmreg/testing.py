"""pytest plugin (placeholder until the integrations work lands)."""
