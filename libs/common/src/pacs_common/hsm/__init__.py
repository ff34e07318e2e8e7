"""Hierarchical storage management: tier policies and crash-safe moves of
stored objects between storage tiers (used by the hsm-migrator service)."""
