"""What the Snakemake workflow plans: chains, checks per tier, code fingerprints."""
