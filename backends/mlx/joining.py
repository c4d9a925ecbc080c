"""A finished prefill joins the running batch without copying its KV cache.

When sequences in mlx-lm's ``BatchGenerator`` finish their prompt, the
generator splits them off its prompt batch (``PromptProcessingBatch.split``)
and extends the running batch with them.  ``split`` deep-copies the whole
prompt batch's KV cache and then drops from each copy the rows it does not
keep: for a long prompt prefilled alone (the usual case while others
stream) that is a full copy of its cache, every layer, paid in the step
where it joins, on top of that step's decode.

:class:`PromptBatch` splits without the copy when every sequence in prefill
finishes together: the finished part takes the caches as they are and the
prompt batch is left empty, which is what ``split`` followed by
``filter([])`` leaves.  A split that keeps some sequences in prefill is
mlx-lm's.  :func:`install` puts one into a new ``BatchGenerator`` (its
prompt batch only ever grows by ``extend``, so it keeps this class).
MLX thread only.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.generate import PromptProcessingBatch


class PromptBatch(PromptProcessingBatch):
    def split(self, indices: list[int]) -> PromptProcessingBatch:
        if sorted(indices) != list(range(len(self.uids))):
            return super().split(indices)
        moved = PromptProcessingBatch.__new__(PromptProcessingBatch)
        moved.__dict__.update(self.__dict__)
        # What filter([]) leaves: no sequences, no caches (new lists: ``moved`` owns the old ones).
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens, self.stop_sequences = [], [], [], []
        return moved


def install(gen: Any) -> None:
    """Give a new ``BatchGenerator`` a :class:`PromptBatch` (before anything is inserted)."""
    old = gen._prompt_batch
    if len(old):
        raise RuntimeError("install() is for a generator with nothing in prefill")
    gen._prompt_batch = PromptBatch.empty(old.model, old.fallback_sampler, prefill_step_size=old.prefill_step_size)
