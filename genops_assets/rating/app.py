"""The rating server: the Mesop UI at ``/`` and a JSON API under ``/api/v1`` in one FastAPI app.

API (rater's name in ``X-Genops-Rater``, token as ``Authorization: Bearer <token>``):

- ``GET /api/v1/tasks/{task}/next``: the rater's next item, blind (answers A / B, no model
  names), and their progress; ``item`` is null when the queue is done.
- ``POST /api/v1/ratings``: one rating, choices and scores by RESPONSE number (``shown_first``
  says which response the rater saw first). 201 with the stored row.

Errors: 401 unknown rater or wrong token, 404 unknown task or item, 409 the rater rated the item
already (the first rating stands), 410 the item left the queue, 422 an invalid rating or
correction (``field`` names the field at fault).
"""

from __future__ import annotations

from typing import Any

from a2wsgi import WSGIMiddleware
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from genops_assets.lib.ratings import AuthError, RatingError
from genops_assets.rating.service import RatingService

RATER_HEADER = "X-Genops-Rater"


class RatingIn(BaseModel):
    task: str
    item_id: str
    choice: str | None = Field(None, description="'1', '2', 'tie' or 'both_bad' (responses by number)")
    shown_first: str | None = Field(None, description="the response shown first (left), '1' or '2'")
    score_1: int | None = None
    score_2: int | None = None
    unsafe_1: bool = False
    unsafe_2: bool = False
    correction: dict[str, Any] | str | None = Field(None, description="the corrected answer (task output schema)")


def create_app(service: RatingService, with_ui: bool = True) -> FastAPI:
    app = FastAPI(title="genops ratings", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.service = service

    @app.exception_handler(RatingError)
    async def rating_error(request: Request, exc: RatingError) -> JSONResponse:
        body = {"detail": str(exc)}
        if getattr(exc, "field", None) is not None:
            body["field"] = exc.field
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    def rater(authorization: str | None = Header(None),
              x_genops_rater: str | None = Header(None, alias=RATER_HEADER)) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token or not x_genops_rater:
            raise AuthError(f"send the rater's name in {RATER_HEADER} and the token as 'Authorization: Bearer ...'")
        service.store.authenticate(x_genops_rater, token.strip())
        return x_genops_rater

    @app.get("/api/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": service.tasks()}

    @app.get("/api/v1/tasks/{task}/next")
    def next_item(task: str, name: str = Depends(rater)) -> dict[str, Any]:
        item = service.next_item(task, name)
        progress = service.progress(task, name)
        return {"task": task, "item": item.as_dict() if item else None,
                "progress": {"done": progress.done, "total": progress.total}}

    @app.post("/api/v1/ratings", status_code=201)
    def post_rating(body: RatingIn, name: str = Depends(rater)) -> dict[str, Any]:
        fields = body.model_dump(exclude={"task", "item_id"})
        return service.submit(body.task, name, body.item_id, **fields)

    if with_ui:
        import mesop as me

        from genops_assets.rating import ui

        ui.configure(service)
        app.mount("/", WSGIMiddleware(me.create_wsgi_app()))
    return app
