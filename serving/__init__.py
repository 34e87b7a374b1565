"""Ray Serve application for Neighbor Diffusion: `serving.app` (deployments, CLI), `serving.schema` (HTTP contract)."""
