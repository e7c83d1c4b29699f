"""deit backbones (filled in by the backbone work)."""
