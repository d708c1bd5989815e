"""Drafters propose token trees for the target to verify: `DraftModel` (a small model),
`PromptLookup` (n-gram matches in the row's own text) and `Retrieval` (suffix matches in a
datastore built from your corpus). Your own: subclass `Drafter` (examples/custom_drafter.py)."""

from jaxdec.drafters.base import Drafter, Proposal, candidates_topology
from jaxdec.drafters.draft_model import DraftModel
from jaxdec.drafters.prompt_lookup import PromptLookup
from jaxdec.drafters.retrieval import Retrieval

__all__ = ["DraftModel", "Drafter", "PromptLookup", "Proposal", "Retrieval", "candidates_topology"]
