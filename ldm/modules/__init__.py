"""Neural-network building blocks shared by the stages (no Lightning, no Hydra)."""
