"""Speculative decoding: propose a few tokens per request, verify them in one target forward pass.

`ngram_proposer.py` proposes (prompt lookup), `rejection_sampler.py` decides which proposals the target
model's distribution keeps, `metrics.py` counts drafts and acceptances. The scheduler carries each running
request's drafts (`Request.spec_token_ids`) and schedules them after its last token; the model runner
verifies them and proposes the next ones (docs/speculative_decoding.md).
"""
