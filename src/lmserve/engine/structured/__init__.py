"""Constrained decoding: JSON schema, any JSON object, regex, a choice of strings, EBNF/Lark grammars.

Backed by llguidance, chosen over xgrammar by measurement on the default model's tokenizer (49,152
tokens; a shared 2-core machine, so times are indicative):

| | llguidance 1.9 | xgrammar 0.2.9 |
|---|---|---|
| tokenizer preparation (once per model) | 0.5-0.9 s | 0.12 s |
| compile one JSON schema (3 varied schemas) | 0.6-1.8 ms | 0.4-5 ms |
| next-token masks, batch 16 / 64 | 0.2-0.7 / 0.4-1.2 ms (parallel fill) | 3.3 / 12.6 ms |
| install | 8 MB, no dependencies | 4 MB, but requires torch, triton (1 GB) and tvm-ffi |
| kinds | JSON schema, regex, Lark, GBNF (converted to Lark) | JSON schema, regex, EBNF |

Both cover every kind lmserve accepts. llguidance computes masks lazily per step with no up-front
per-grammar cost, fills a batch's masks in parallel without the GIL, and installs nothing else, which
keeps the CPU-only install small. Its own ``apply`` helper is ``torch.compile``d (seconds on the
first call on a CPU), so the mask is applied by ``bitmask.apply_bitmask`` instead.

``grammar`` turns a ``StructuredOutputs`` into grammar text and checks it (torch-free, for the
frontend); ``manager`` holds the engine's per-request matchers.
"""

from lmserve.engine.structured.grammar import check_structured, grammar_text

__all__ = ["check_structured", "grammar_text"]
