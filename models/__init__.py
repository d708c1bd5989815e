"""Model families as pure functions over parameter pytrees (installed as jaxdec.models)."""
