"""Applications on the platform, one package each, plugging into the layers through the contracts."""
