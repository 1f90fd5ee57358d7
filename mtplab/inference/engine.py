"""The decoding engine: many requests decoded together in one preallocated KV cache, each with its
own length, sampling parameters, random generator and number of drafts.

Every step
1. admits waiting requests into free cache rows and prefills them together (right-padded to the
   longest prompt, in chunks of `prefill_chunk` positions): each gets its first token;
2. advances every decoding row with one forward of [pending token, drafts...] per row, right-
   padded to the longest row (rows without drafts are plain decoding: one input);
3. verifies each row's drafts against head 0 (speculative.verify_row) and keeps that row's own
   number of tokens: its cache length moves to the accepted end, the rest is garbage that the
   next write overwrites and the ragged attention mask never shows;
4. drafts each row's next tokens from its heads at its last accepted position;
5. frees the rows that finished (eos, token limit) or were cancelled: the last row moves into the
   hole, so the decoding rows stay contiguous and one cache view covers them.

Greedy rows therefore produce exactly plain greedy decoding's tokens and sampling rows exactly
head 0's distribution, whatever the other rows do. Sequential (DeepSeek) depths run per row on
caches of their own (heads.SequentialDrafter); the trunk forward is batched for every
family.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import MtplabError
from ..models.transformer import Transformer
from .sampling import SamplingParams, next_token_probs
from .speculative import Randomness, SpeculativeStats, verify_row
from .tree import DraftTree, verify_tree


@dataclass
class Event:
    tokens: list[int]  # new tokens, in order
    accepted: list[bool] = field(default_factory=list)  # per token: an accepted draft, else computed
    drafts: list[int] = field(default_factory=list)  # the draft tokens this forward verified
    finished: bool = False  # eos reached (eos itself is not in tokens) or the token limit
    branch: tuple[int, ...] | None = None  # a tree step's accepted branch: its deepest node's ranks

    def __post_init__(self) -> None:
        if not self.accepted:
            self.accepted = [False] * len(self.tokens)


def fit_prompt(model: Transformer, prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
    """Keep the prompt's last tokens (all of it when it fits, leaving room for one new token) and cap
    the new tokens to the room left in the context window."""
    if not prompt:
        raise MtplabError("the prompt is empty")
    if max_new_tokens < 1:
        raise MtplabError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    window = model.config.max_seq_len
    prompt = prompt[-(window - 1):]
    return prompt, min(max_new_tokens, window - len(prompt))


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 128
    params: SamplingParams = SamplingParams()
    eos_id: int | None = None
    n_draft: int = 0  # drafts per step (0: plain decoding)
    chance: Randomness | None = None  # default: a generator seeded by params.seed
    stats: SpeculativeStats | None = None  # filled in as the request decodes
    tree: bool = True  # verify the engine's tree when it has one (False: draft a chain instead)


class Row:
    """A request in the engine: where it stands and what it decodes next."""

    def __init__(self, engine: "Engine", request: Request):
        model = engine.model
        self.request = request
        self.prompt, self.limit = fit_prompt(model, request.prompt, request.max_new_tokens)
        self.params, self.eos_id = request.params, request.eos_id
        self.n_draft = request.n_draft
        self.chance = request.chance or Randomness(request.params.generator(model.device))
        self.stats = request.stats if request.stats is not None else SpeculativeStats()
        self.stats.proposed = self.stats.proposed or [0] * self.n_draft
        self.stats.accepted = self.stats.accepted or [0] * self.n_draft
        self.tokens = list(self.prompt)  # every token so far; the last one is pending (not cached)
        self.reused = 0  # prompt tokens whose keys and values came from another row's cache
        self.produced = 0
        self.drafts: list[int] = []
        self.qs: list[torch.Tensor | None] = []  # each draft's distribution (None: greedy)
        self.finished = self.cancelled = False
        # a family whose drafts cannot come from the batched forward drafts per row
        self.drafter = model.heads.drafter(model, self.n_draft, engine.cache.max_len)
        # the engine's tree cut to this row's drafts: heads that all read one position draft it
        # as it is (their top tokens); a drafter, whose depths read the drafts before them, grows a
        # tree of that size and width each step (SequentialDrafter.draft_tree)
        wants_tree = engine.tree is not None and self.n_draft > 0 and request.tree
        self.tree = engine.tree.pruned(self.n_draft) if wants_tree else None
        self.step_tree: DraftTree | None = None  # the tree that row.drafts holds the tokens of

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled

    def pick(self, logits: torch.Tensor, greedy_token: int | None = None) -> tuple[int, torch.Tensor | None]:
        if self.params.greedy:
            return (int(logits.argmax()) if greedy_token is None else greedy_token), None
        probs = next_token_probs(logits, self.params)
        return self.chance.draw(probs), probs

    def room(self) -> int:
        """Drafts worth making now: never past the token limit."""
        return min(self.n_draft, self.limit - self.produced)


def rows_that_fit(model: Transformer, n_draft: int, budget_bytes: int, most: int = 64) -> int:
    """Engine rows whose KV cache fits in `budget_bytes` (at least 1, at most `most`): how large a
    batch a server can keep by default without sizing it by hand."""
    c = model.config
    layers = model.cache_layers(model.n_think_loops) + model.heads.cache_layers
    slots = c.max_seq_len + n_draft
    per_row = 2 * layers * c.kv_heads * slots * c.head_dim * model.wte.weight.element_size() + 8 * slots
    return max(1, min(most, budget_bytes // per_row))


def sampling_probs(rows: list[Row], logits: torch.Tensor) -> list[torch.Tensor | None]:
    """Per row, its distributions from logits [R, ..., V] after its own temperature, top-k and
    top-p (None for greedy rows): rows that share those parameters in one call, since a call costs
    a dozen small kernels whatever its size."""
    groups: dict[tuple, list[int]] = {}
    for j, r in enumerate(rows):
        if not r.params.greedy:
            groups.setdefault((r.params.temperature, r.params.top_k, r.params.top_p), []).append(j)
    out: list[torch.Tensor | None] = [None] * len(rows)
    for js in groups.values():
        probs = next_token_probs(logits[js], rows[js[0]].params)
        for i, j in enumerate(js):
            out[j] = probs[i]
    return out


class Engine:
    def __init__(self, model: Transformer, max_batch: int = 16, n_draft: int = 0,
                 prefill_chunk: int = 256, reuse_prefix: int = 16, tree: DraftTree | None = None):
        """`reuse_prefix`: a new prompt that shares at least this many leading tokens with a
        decoding row (a system prompt, the earlier turns of a chat) copies that row's keys and
        values instead of recomputing them (0: never). `tree`: speculating rows verify this tree
        of drafts each step instead of a chain (tree.py; cut to each row's n_draft deep; families
        with a per-row drafter grow a tree as large and as wide each step), unless their request
        asks for a chain (`Request.tree`): rows of one batch may mix trees, chains and plain
        decoding, each lossless on its own."""
        if max_batch < 1:
            raise MtplabError(f"max_batch must be >= 1, got {max_batch}")
        most = model.n_future - 1
        if not 0 <= n_draft <= most:
            raise MtplabError(f"n_draft must be between 0 and {most} (the model has {model.n_future} heads)")
        if tree is not None and tree.depth > most:
            raise MtplabError(f"the draft tree is {tree.depth} deep; the model has {most} draft heads")
        self.model, self.max_batch, self.n_draft, self.tree = model, max_batch, n_draft, tree
        self.prefill_chunk, self.reuse_prefix = prefill_chunk, reuse_prefix
        # Heads whose blocks keep cache layers must see every position; the others draft from the
        # trunk's state at one position per row.
        self.cached_heads = model.heads.cache_layers > 0
        self.n_heads = 1 + n_draft if self.cached_heads else 1
        # drafted positions past a row's end are written too (and dropped): room for them
        extra = max(n_draft, tree.size if tree is not None else 0)
        self.cache = model.new_cache(batch=max_batch, max_len=model.config.max_seq_len + extra)
        self.rows: list[Row] = []  # rows[i] owns cache row i
        self.waiting: deque[Row] = deque()

    # -- requests -------------------------------------------------------------------------------
    def submit(self, request: Request) -> Row:
        """Queue a request; it joins the batch at the next step with a free row."""
        if request.n_draft > self.n_draft:
            raise MtplabError(f"this engine drafts at most {self.n_draft} tokens per step")
        row = Row(self, request)
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop a request: a waiting one leaves now, a decoding one frees its row at the next step."""
        row.cancelled = True
        if row in self.waiting:
            self.waiting.remove(row)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    # -- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[Row, Event]]:
        """Admit and prefill waiting requests, advance every decoding row once; the events."""
        t0 = time.perf_counter()
        self._release()
        events = []
        decoding = len(self.rows)
        admitted = []
        while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
            admitted.append(self.waiting.popleft())
        if decoding:
            events += self._decode(self.rows)
        if admitted:
            events += self._prefill(admitted)
        elapsed = time.perf_counter() - t0
        for row in {id(r): r for r, _ in events}.values():
            row.stats.seconds += elapsed
        self._release()
        return events

    def _release(self) -> None:
        """Free finished and cancelled rows; the last row moves into each hole."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].done:
                last = len(self.rows) - 1
                if i != last:
                    self.cache.copy_row(last, i)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1

    def _prefill(self, rows: list[Row]) -> list[tuple[Row, Event]]:
        """Prompts into the free rows after the decoding ones, longest first so that the rows
        still reading a chunk are always a prefix; each row's first token and drafts."""
        first = len(self.rows)
        donors = [self._donor(r) for r in rows]  # (decoding row, shared length) or None
        for r, donor in zip(rows, donors):
            r.reused = donor[1] if donor else 0
        # the longest still to read first, so that the rows reading a chunk stay a prefix
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt) - rows[i].reused, reverse=True)
        rows[:], donors = [rows[i] for i in order], [donors[i] for i in order]
        for j, donor in enumerate(donors):
            self.cache.lengths[first + j] = 0
            if donor:
                self.cache.copy_row(donor[0], first + j, donor[1])
        self.rows.extend(rows)
        longest, chunk = len(rows[0].prompt) - rows[0].reused, self.prefill_chunk
        last_hidden: list[list[torch.Tensor]] = [[] for _ in rows]  # per row, per head: [D]
        trunk_states: list[list[torch.Tensor]] = [[] for _ in rows]  # rows with a drafter: [1, n, D] chunks
        begin = 0
        while begin < longest:
            reading = [r for r in rows if len(r.prompt) - r.reused > begin]
            # a row that reused a long start must not be padded past the cache's end
            width = min(chunk, longest - begin, *(self.cache.max_len - r.reused - begin for r in reading))
            ids = torch.zeros(len(reading), width, dtype=torch.long)
            for j, r in enumerate(reading):
                part = r.prompt[r.reused + begin:r.reused + begin + width]
                ids[j, :len(part)] = torch.tensor(part)
            view = self.cache.view(first, first + len(reading))
            reads = [min(width, len(r.prompt) - r.reused - begin) for r in reading]
            # Only each row's last position has a reader (its first token, its drafts): the heads'
            # blocks compute keys and values for the rest.
            last = torch.tensor([n - 1 for n in reads], device=self.model.device)
            *heads, trunk = self.model.hidden_states(ids.to(self.model.device), view, self.n_heads,
                                                     with_trunk=True, outputs_at=last)
            for j, (r, n) in enumerate(zip(reading, reads)):
                self.cache.lengths[first + j] += n
                if r.drafter is not None:
                    trunk_states[j].append(trunk[j:j + 1, :n])
                if r.reused + begin + n == len(r.prompt):
                    last_hidden[j] = [h[j, 0] for h in heads] + [trunk[j, n - 1]]
            begin += width
        head0 = self.model.logits(torch.stack([h[0] for h in last_hidden]))  # [R, V]
        greedy = head0.argmax(-1).tolist()
        events, drafting = [], []
        for j, r in enumerate(rows):
            r.stats.prefills += 1  # the prompt's forward: apart from tau's decoding forwards
            token, _ = r.pick(head0[j], greedy[j])
            if token == r.eos_id:
                r.finished = True
                events.append((r, Event([], finished=True)))
                continue
            r.tokens.append(token)
            r.produced = 1
            r.stats.tokens += 1
            r.finished = r.produced >= r.limit
            events.append((r, Event([token], finished=r.finished)))
            if r.drafter is not None:
                r.drafter.accept(torch.cat(trunk_states[j], 1), r.tokens)
            if not r.finished:
                drafting.append((r, last_hidden[j]))
        self._draft(drafting)
        return events

    def _donor(self, row: Row) -> tuple[int, int] | None:
        """The decoding row whose cached tokens share the longest start with `row`'s prompt, and
        that length (at most the prompt's minus one: its last token must be computed), when it
        reaches `reuse_prefix`. A row with its own drafter reads every prompt position itself."""
        if not self.reuse_prefix or row.drafter is not None:
            return None
        best, prompt = None, row.prompt
        for i, other in enumerate(self.rows):
            cached = other.tokens[:min(self.cache.lengths[i], len(prompt) - 1)]
            n = len(os.path.commonprefix([cached, prompt]))
            if n >= self.reuse_prefix and (best is None or n > best[1]):
                best = (i, n)
        return best

    def _decode(self, rows: list[Row]) -> list[tuple[Row, Event]]:
        inputs = [[r.tokens[-1]] + r.drafts for r in rows]
        width = max(len(x) for x in inputs)
        ids = torch.tensor([x + [x[0]] * (width - len(x)) for x in inputs], device=self.model.device)
        view = self.cache.view(0, len(rows))
        parents = None
        if any(r.step_tree for r in rows):  # each position's parent: a tree's, else the one before
            parents = torch.tensor([(r.step_tree.parents() if r.step_tree else list(range(-1, len(x) - 1)))
                                    + list(range(len(x) - 1, width - 1)) for r, x in zip(rows, inputs)],
                                   device=self.model.device)
        hidden = self.model.hidden_states(ids, view, self.n_heads, with_trunk=True, parents=parents)
        # Heads that share the unembedding and came with the forward: every head's logits at every
        # position in one call, so a step reads the unembedding once, as a plain step does (at
        # batch 1 decoding is bound by reading weights, not by the few extra rows of arithmetic).
        merged = self.n_heads > 1
        if merged:
            every = self.model.stacked_logits(hidden[:self.n_heads])  # [R, T, H, V]
            head0, greedy_every = every[:, :, 0], every.argmax(-1).tolist()
            greedy = [[per_head[0] for per_head in row] for row in greedy_every]
        else:
            head0 = self.model.logits(hidden[0])  # [R, T, V]
            greedy = head0.argmax(-1).tolist()
        probs = sampling_probs(rows, head0)  # sampling rows: [T, V] each
        events, drafting, merged_rows = [], [], []
        for j, r in enumerate(rows):
            r.stats.forwards += 1
            branch = None
            if r.step_tree is not None:
                new, flags, path = verify_tree(r, r.step_tree, head0[j], greedy[j], probs[j])
                self.cache.keep_path(j, self.cache.lengths[j], [0] + path)
                at = path[-1] if path else 0  # the last accepted position: the next drafts' source
                branch = r.step_tree.paths[at - 1] if at else ()
            else:
                new, flags = verify_row(r, head0[j], greedy[j], probs[j])
                at = sum(flags)
                self.cache.lengths[j] += 1 + at
            drafts, r.drafts, r.qs, r.step_tree = r.drafts, [], [], None
            if r.eos_id in new:
                cut = new.index(r.eos_id)
                r.stats.tokens += cut
                r.finished = True
                events.append((r, Event(new[:cut], flags[:cut], drafts, finished=True, branch=branch)))
                continue
            new, flags = new[:r.limit - r.produced], flags[:r.limit - r.produced]
            r.produced += len(new)
            r.stats.tokens += len(new)
            r.tokens.extend(new)
            r.finished = r.produced >= r.limit
            events.append((r, Event(new, flags, drafts, finished=r.finished, branch=branch)))
            if r.drafter is not None:
                kept = [0] + path if branch is not None else list(range(1 + at))
                r.drafter.accept(hidden[0][j:j + 1, kept], r.tokens)
            if r.finished:
                continue
            if merged and r.drafter is None:
                merged_rows.append((r, j, at))
            else:
                drafting.append((r, [h[j, at] for h in hidden]))
        if merged_rows:  # drafts from the heads' logits at each row's last accepted position
            heads_rows, js, ats = zip(*merged_rows)
            self._drafts_from(list(heads_rows), every[list(js), list(ats), 1:],
                              [greedy_every[j][at][1:] for _, j, at in merged_rows])
        self._draft(drafting)
        return events

    def _drafts_from(self, rows: list[Row], logits: torch.Tensor, greedy: list[list[int]]) -> None:
        """Each row's drafts from its heads' logits (logits [R, m, V], greedy their argmax)."""
        chains = [j for j, r in enumerate(rows) if r.tree is None]  # a tree's nodes are top ranks
        probs: list[torch.Tensor | None] = [None] * len(rows)
        for j, p in zip(chains, sampling_probs([rows[j] for j in chains], logits[chains])):
            probs[j] = p
        for j, r in enumerate(rows):
            self._take_drafts(r, logits[j], greedy[j], probs[j])

    @staticmethod
    def _take_drafts(row: Row, logits: torch.Tensor, greedy: list[int], probs: torch.Tensor | None) -> None:
        """Row's drafts from its heads' logits [m, V] at its last accepted position: its tree's
        node tokens (cut to the room left), else a chain: greedy's argmax per head, or draws from
        `probs` [m, V], the heads' distributions after a sampling row's parameters."""
        if row.tree is not None:
            room = row.room()  # the whole tree unless the token limit is near
            row.step_tree = row.tree if room >= row.tree.depth else row.tree.pruned(room)
            if row.step_tree is not None:
                row.drafts = row.step_tree.tokens(logits)
            return
        room = row.room()
        if row.params.greedy:
            row.drafts, row.qs = greedy[:room], [None] * room
            return
        qs = probs[:room]
        row.drafts = [row.chance.draw(q) for q in qs]
        row.qs = list(qs)

    def _draft(self, rows: list[tuple[Row, list[torch.Tensor]]]) -> None:
        """Each row's drafts for its next step, from its heads at its last accepted position
        (hidden: that position's state of every head the forward computed, then the trunk's)."""
        rows = [(r, h) for r, h in rows if r.room()]
        if not rows:
            return
        for r in (r for r, _ in rows if r.drafter is not None):
            if r.tree is not None:
                nodes = r.drafter.draft_tree(min(r.tree.depth, r.room()), max(r.tree.ranks_per_depth()),
                                             r.tree.size)
                r.step_tree, tokens = DraftTree(tuple(p for p, _ in nodes)), dict(nodes)
                r.drafts = [tokens[p] for p in r.step_tree.paths]
                continue
            for k in range(1, r.room() + 1):
                d, q = r.pick(r.drafter.draft_logits(k, r.drafts))
                r.drafts.append(d)
                r.qs.append(q)
        rows = [(r, h) for r, h in rows if r.drafter is None]
        if not rows:
            return
        m = max(r.room() for r, _ in rows)
        model = self.model
        if self.cached_heads:  # every head's state at the position came with the forward
            states = [torch.stack([h[k] for _, h in rows]) for k in range(1, m + 1)]  # m x [R, D]
        else:
            trunk = torch.stack([h[-1] for _, h in rows])[:, None]  # [R, 1, D]
            states = [s[:, 0] for s in model.heads_hidden(trunk, 1 + m)[1:]]
        logits = model.stacked_logits(states, first=1)  # [R, m, V]
        self._drafts_from([r for r, _ in rows], logits, logits.argmax(-1).tolist())

    # -- convenience ----------------------------------------------------------------------------
    def stream(self, row: Row):
        """Step until `row` is done, yielding its events (other rows advance alongside)."""
        try:
            while not row.done:
                for r, event in self.step():
                    if r is row:
                        yield event
        finally:
            if not row.done:
                self.cancel(row)
                self._release()
