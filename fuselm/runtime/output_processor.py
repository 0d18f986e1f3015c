"""Output processing: a sampled token becomes text, a stop decision and a `RequestOutput`.

For each sampled token the processor appends it to its request, feeds the incremental
detokenizer (detokenizer.py), checks the stop conditions in vLLM's order (a stop token
id, then EOS unless ignored, then a stop string, then the length limits) and, for a stop
string, trims the output back to the tokens whose text precedes the cut and rolls the
KV cache back with them, so token ids, text and cached prefix agree. A request whose
detokenizing raises ends with finish_reason "error" and the message, alone.

The scheduler owns the KV cache; the processor asks it to finish or truncate a request.
"""
from __future__ import annotations

from typing import Optional

from .intake import RequestIntake
from .request import Request, RequestOutput
from .scheduler import Scheduler


class OutputProcessor:
    def __init__(self, intake: RequestIntake, scheduler: Scheduler, requests: dict, eos_token_ids,
                 max_model_len: int):
        self.intake, self.scheduler = intake, scheduler
        self.requests = requests  # the engine's live requests by key: an ended one leaves it here
        self.tokenizer = intake.tokenizer
        self.eos_token_ids, self.max_model_len = tuple(eos_token_ids), max_model_len

    def advance(self, request: Request, token: int, logprobs) -> Optional[RequestOutput]:
        """Append a sampled token, then finish the request if a stop condition holds. The
        output, or None for a running request that reports only its end."""
        try:
            request.append_token(token, logprobs)
            stop_string = request.detokenizer.add_token(token)
            self._check_stop(request, token, stop_string)
            piece = "" if request.final_output_only else request.detokenizer.stream_piece()
        except Exception as err:  # noqa: BLE001 - the request ends with the message
            return self.fail(request, f"{type(err).__name__}: {err}")
        if request.finished:
            self.scheduler.finish(request)
            return self.retire(request, piece + request.detokenizer.flush())
        return None if request.final_output_only else request.output(piece)

    def _check_stop(self, request: Request, token: int, stop_string: Optional[str]) -> None:
        params = request.params
        if token in params.stop_token_ids:
            request.finish("stop", stop_reason=token)
        elif not params.ignore_eos and token in self.eos_token_ids:
            request.finish("stop")
        elif stop_string is not None:
            request.finish("stop", stop_reason=stop_string)
            self._trim_to_text(request)
        elif len(request.output_token_ids) >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.finish("length")

    def _trim_to_text(self, request: Request) -> None:
        """After a stop string, keep only the tokens whose text precedes its cut."""
        cut = len(request.detokenizer.text)
        keep = len(request.output_token_ids)
        skip = request.params.skip_special_tokens
        while keep > 0 and len(self.tokenizer.decode(request.output_token_ids[:keep], skip_special_tokens=skip)) > cut:
            keep -= 1
        self.truncate(request, len(request.prompt_token_ids) + keep)

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Roll a request back to its first `num_tokens` tokens (prompt included): output
        tokens, logprobs and cached K/V past that point are dropped."""
        keep = num_tokens - len(request.prompt_token_ids)
        if keep < 0:
            raise ValueError(f"cannot truncate into the prompt ({len(request.prompt_token_ids)} tokens)")
        request.truncate_output(keep)
        self.scheduler.roll_back(request, num_tokens)
        if not request.finished:  # it goes on: its text restarts from the kept tokens
            request.detokenizer = self.intake.new_detokenizer(request.prompt_token_ids, request.params,
                                                              request.final_output_only)
            for token in request.output_token_ids:
                request.detokenizer.add_token(token)

    def fail(self, request: Request, message: str) -> RequestOutput:
        request.finish("error", error=message)
        self.scheduler.finish(request)
        return self.retire(request, "")

    def retire(self, request: Request, piece: str) -> RequestOutput:
        self.requests.pop(request.key, None)
        return request.output(piece)
