"""pvt_v2 backbones (filled in by the backbone work)."""
