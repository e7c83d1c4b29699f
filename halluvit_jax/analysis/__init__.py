"""Analysis tools: head redundancy (CCS) and attention-map figures."""
