"""The methods: per-layer decisions and caches over the kernels (DiTFastAttn, AdaSpa); no model knowledge."""
