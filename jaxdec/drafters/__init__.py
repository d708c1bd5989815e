"""Drafters propose token trees for the target to verify: `DraftModel` (a small model),
`PromptLookup` (n-gram matches in the row's own text) and `Retrieval` (suffix matches in a
datastore built from your corpus). Your own: subclass `Drafter` (examples/custom_drafter.py)."""

from jaxdec.drafters.base import Drafter, Proposal, candidates_topology
from jaxdec.drafters.draft_model import DraftModel
from jaxdec.drafters.prompt_lookup import PromptLookup
from jaxdec.drafters.retrieval import Retrieval
from jaxdec.verify import ProposalKind  # (a Proposal's kind: a drafter of your own names one)

__all__ = ["DraftModel", "Drafter", "PromptLookup", "Proposal", "ProposalKind", "Retrieval",
           "candidates_topology"]
