"""morph: grow CNNs the MixtureGrowth way, on any standard architecture."""
