"""vLLM-side MASSV drafter classes (registered lazily by the plugin; import only inside vLLM)."""
