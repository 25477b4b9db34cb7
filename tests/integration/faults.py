"""Faults injected into every Ray worker of a test cluster (``worker_process_setup_hook``): each
fires only for requests whose prompt starts with its marker token, so other requests run as usual.
They stand for failures validation cannot catch."""
from __future__ import annotations

DETOKENIZE_FAULT = 251  # a prompt starting with this fails in its request's detokenization
STEP_FAULT = 252  # a step whose batch holds a prompt starting with this raises (the whole step)


def install() -> None:
    from tandem.engine import engine as engine_module
    from tandem.engine.runner import ModelRunner

    detokenize, run = engine_module.detokenize_step, ModelRunner.run

    def faulty_detokenize(tokenizer, token_ids, state):
        if token_ids[0] == DETOKENIZE_FAULT:
            raise RuntimeError("injected detokenizer fault")
        return detokenize(tokenizer, token_ids, state)

    def faulty_run(self, plan):
        if any(seq.token_ids[0] == STEP_FAULT for seq in plan.seqs):
            raise RuntimeError("injected step fault")
        return run(self, plan)

    engine_module.detokenize_step = faulty_detokenize
    ModelRunner.run = faulty_run
