"""A site's recommendation service over HTTP (FastAPI, served by uvicorn).

The service reads the run's saved recommender and the site's users once, at
start, and answers from memory:

- ``GET /health``: the run, its task and pipeline, and how many items and users;
- ``GET /users/{id}/recommendations?k=10&exclude_seen=true``: a site user's top
  ``k``, from their own interactions (the id as the site's data has it);
- ``POST /recommendations`` with ``{"interactions": [{"item": "50", "rating":
  5}, ...], "k": 10}``: the top ``k`` for a person who is not in the site's
  data, folded in from the interactions given (no training; ``rating`` may be
  left out for implicit feedback);
- ``GET /items/{id}/similar?k=10``: the items most similar in the released
  item graph.

Each answer is ``{"items": [{"rank", "item", "text", "score"}, ...]}``.
Requests are answered one at a time on the event loop, each with one torch
thread: a few milliseconds of numpy and torch each, which threads would only
make contend for the GIL and the cores. An
error is ``{"error": message}``: 404 for an unknown user or item, 422 for a
bad parameter or body.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from client.recommender import NotFound, Recommender, SiteUsers, ranked
from common.errors import InputError


class Interaction(BaseModel):
    item: str
    rating: float | None = None


class FoldIn(BaseModel):
    interactions: list[Interaction] = Field(min_length=1)
    k: int = Field(10, ge=1)
    exclude_seen: bool = True


def make_app(recommender: Recommender, users: SiteUsers, run_dir: Path) -> FastAPI:
    """The service of one site: ``recommender`` from ``run_dir``, for ``users``."""
    app = FastAPI(title="fedgraphrec", description=__doc__.split("\n\n")[0])

    @app.exception_handler(InputError)
    def input_error(request: Request, error: InputError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, 404 if isinstance(error, NotFound) else 422)

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": problems}, 422)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "run": str(run_dir),
            "task": recommender.config.task,
            "item-graph": recommender.config.item_graph,
            "items": recommender.catalogue.num_items,
            "users": users.site.num_users,
        }

    @app.get("/users/{user_id}/recommendations")
    async def user_recommendations(
        user_id: str, k: int = Query(10, ge=1), exclude_seen: bool = True
    ) -> dict:
        return {"items": ranked(recommender.recommend(users.user(user_id), k, exclude_seen))}

    @app.post("/recommendations")
    async def fold_in(body: FoldIn) -> dict:
        rows = [i.item if i.rating is None else (i.item, i.rating) for i in body.interactions]
        return {"items": ranked(recommender.recommend(rows, body.k, body.exclude_seen))}

    @app.get("/items/{item_id}/similar")
    async def similar(item_id: str, k: int = Query(10, ge=1)) -> dict:
        return {"items": ranked(recommender.similar(item_id, k))}

    return app
