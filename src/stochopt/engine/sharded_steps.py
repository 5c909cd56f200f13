"""How the engine steps sharded (FSDP2, ``DTensor``) parameters whose update is not elementwise, as a base of
``EngineOptimizer``: the choice of path per parameter, the owners' full-size stand-ins around a step, and updates
split around a whole-matrix function. The collectives and the books themselves are engine/sharded.py."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from stochopt.engine import sharded
from stochopt.engine.layout import STEP, spec_dtype
from stochopt.engine.update import MatrixUpdate


class ShardedSteps:
    """The sharded half of ``EngineOptimizer`` (which defines ``state``, ``param_groups``, ``_layout``,
    ``_apply_update`` and ``_whole_tensor_update``)."""

    def _whole_tensor(self, group: dict[str, Any], p: Tensor) -> bool:
        """``p``, sharded, is stepped as a whole on its owner: the update reduces over the tensor (the class
        says so, or the cautious mask's per-tensor scale), or centralizes rows that ranks hold only in part."""
        rows_split = group["centralize_gradients"] and p.dim() > 1 and not sharded.rows_whole(p)
        return self._whole_tensor_update or bool(group["cautious"]) or rows_split

    def _gather_whole_tensors(self) -> None:
        """Sharded parameters of whole-tensor updates: the owner gets a full-size stand-in with the full gradient,
        whose state is the parameter's (engine/sharded.py ``ShardBooks``); ``_collect`` hands it out instead of
        the parameter, and other ranks skip the parameter."""
        name = type(self).__name__
        whole = [
            (name, group["params"], p)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and sharded.is_sharded(p) and self._whole_tensor(group, p)
        ]
        if whole:  # nothing to gather: no attribute is touched (a step traced by torch.compile stays clean)
            self._shards.gather_stand_ins(self.state, whole)

    @property
    def _shards(self) -> sharded.ShardBooks:
        return self.__dict__.setdefault("_shard_books", sharded.ShardBooks())

    @property
    def sharded_bytes(self) -> list[int]:
        """[sent, received] by this rank so far for the sharded parameters' whole-tensor work: the gathers to
        each owner and the scatters back (engine/sharded.py)."""
        books = self.__dict__.get("_shard_books")
        return books.moved if books is not None else [0, 0]

    def _stand_ins(self) -> dict[int, Tensor | None]:
        """This step's stand-ins by id of the parameter (None: stepped on another rank); empty between steps."""
        books = self.__dict__.get("_shard_books")
        return books.stand_ins if books is not None else {}

    def _owned_elsewhere(self, group: dict[str, Any], p: Tensor) -> bool:
        """``p`` is sharded and stepped whole by another rank (or not yet assigned: a fresh optimizer loading a
        checkpoint assigns owners at its first step; a rank that owns it then loads its full state, below)."""
        return sharded.is_sharded(p) and self._whole_tensor(group, p)

    def _parameter_of(self, p: Tensor) -> Tensor:
        """The parameter a tensor handed to ``_step_group`` stands for (a sharded parameter's full-size stand-in
        on its owner, see ``_gather_whole_tensors``), or ``p`` itself."""
        books = self.__dict__.get("_shard_books")
        return books.stand_in_for.get(id(p), p) if books is not None else p

    def _scatter_whole_tensors(self) -> None:
        """The owners' new values back to every rank's shard, and their step counters to the other ranks
        (``ShardBooks.scatter``)."""
        stand_ins = self._stand_ins()
        if not stand_ins:
            return
        entries = [(g, p) for g in self.param_groups for p in g["params"] if id(p) in stand_ins]
        counted = [p for group, p in entries if STEP in self._layout(group)]
        self._shards.scatter(self.state, [p for _, p in entries], counted, lambda p: spec_dtype(STEP, p, None))

    def _release_stand_ins(self) -> None:
        books = self.__dict__.get("_shard_books")
        if books is not None:
            books.release(self.state)

    def _apply_matrix_update(
        self, group: dict[str, Any], update: MatrixUpdate, p: Tensor, g: Tensor, c: dict[str, Any]
    ) -> None:
        """``_apply_update`` of an update split around a whole-matrix function (engine/update.py
        ``MatrixUpdate``). A sharded ``p`` keeps its state sharded: ``before`` runs on each rank's shard, its
        result is gathered to the matrix's owner (``ShardBooks.owner``: balanced by size, fixed), ``matrix`` runs
        there, its result is scattered back and ``after`` applies each rank's part: two transfers of the matrix
        (``2 n (w - 1) / w`` elements on the owner) against the stand-in path's three (parameter and gradient in,
        parameter out), and the elementwise state per rank falls with the world size."""
        if not sharded.is_sharded(p):
            self._apply_update(group, update, p, g, c)
            return
        owner = self._shards.owner(type(self).__name__, group["params"], p)
        moved = self._shards.moved

        def on_shards(p_: Tensor, g_: Tensor, state: dict[str, Tensor], c_: dict[str, Any]) -> None:
            x = update.before(p_, g_, state, c_)
            update.after(p_, sharded.on_owner(lambda full: update.matrix(full, c_), x, p, owner, moved), state, c_)

        self._apply_update(group, on_shards, p, g, c)
