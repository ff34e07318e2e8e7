"""WADO-RS pixel resources (PS3.18 10.4, 8.3.5): rendered images and
thumbnails of an instance or a frame, and (from :mod:`dicomweb_api.frames`)
frames and bulk data.

Rendering: Modality LUT (rescale slope / intercept), VOI window (``window``
query parameter, else the stored Window Center / Width, else the pixel
range), MONOCHROME1 inverted, color as 8-bit RGB, scaled to fit the
``viewport``; JPEG (default) or PNG by ``Accept`` (or the ``accept`` query
parameter).  Instance-level resources show the first frame; a thumbnail is
the rendered image fitted to 128 px unless a viewport is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Final

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from dicomweb_api import frames
from dicomweb_api.accept import parse_accept
from dicomweb_api.context import ApiContext, get_context
from dicomweb_api.frames import INSTANCE_PATH
from dicomweb_api.media import conditional_headers, etag_for, if_none_match_hits, not_modified
from dicomweb_api.pixels import (
    PALETTE_DATA_TAGS,
    PIXEL_DATA_TAGS,
    PIXEL_ELEMENTS,
    FrameNotFoundError,
    ImageFormat,
    NotAnImageError,
    PixelInfo,
    RenderParams,
    UnsupportedPixelDataError,
    VoiFunction,
    Window,
    apply_palette,
    decode_frame,
    read_frames,
    read_palette,
    render_image,
)
from dicomweb_api.security import Permission, require
from dicomweb_api.security.audit import instances_accessed
from dicomweb_api.stored import check_online, find_instance, restoring, run_blocking, storage_of

__all__ = ["THUMBNAIL_SIZE", "create_router", "parse_render_params"]

#: The viewport of a thumbnail when none is asked for.
THUMBNAIL_SIZE: Final = (128, 128)
_MAX_VIEWPORT: Final = 4096
_DEFAULT_QUALITY: Final = 90

WindowParam = Annotated[
    str | None,
    Query(description="center,width[,function]: function linear (default), linear-exact or sigmoid"),
]
ViewportParam = Annotated[
    str | None, Query(description="width,height of the viewport the image is fitted into")
]
QualityParam = Annotated[int | None, Query(ge=1, le=100, description="JPEG quality, 1-100")]
AcceptParam = Annotated[str | None, Query(description="media type, overriding the Accept header")]


def _choose_format(accept: str | None) -> ImageFormat:
    for media in parse_accept(accept):
        for image_format in ImageFormat:  # JPEG first: the default for image/* and */*
            if media.matches(image_format.value):
                return image_format
    raise HTTPException(status_code=406, detail="rendered images are sent as image/jpeg or image/png")


def _parse_window(window: str) -> Window:
    parts = [p.strip() for p in window.split(",")]
    try:
        if len(parts) not in (2, 3):
            raise ValueError("expected center,width[,function]")
        center, width = float(parts[0]), float(parts[1])
        function = VoiFunction(parts[2].lower().replace("_", "-")) if len(parts) == 3 else VoiFunction.LINEAR
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"invalid window {window!r}: {exc}") from exc
    if not width > 0 or (function is VoiFunction.LINEAR and width < 1):
        raise HTTPException(status_code=400, detail=f"invalid window {window!r}: the width is too small")
    return Window(center, width, function)


def _parse_viewport(viewport: str) -> tuple[int, int]:
    parts = [p.strip() for p in viewport.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError("expected width,height (source regions are not supported)")
        width, height = int(parts[0]), int(parts[1])
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"invalid viewport {viewport!r}: {exc}") from exc
    if not (0 < width <= _MAX_VIEWPORT and 0 < height <= _MAX_VIEWPORT):
        raise HTTPException(
            status_code=400, detail=f"viewport dimensions must be between 1 and {_MAX_VIEWPORT}"
        )
    return width, height


def parse_render_params(
    *,
    accept: str | None,
    window: str | None,
    viewport: str | None,
    quality: int | None,
    default_viewport: tuple[int, int] | None = None,
) -> RenderParams:
    """The rendering a request asks for; 400 / 406 for what cannot be honoured."""
    return RenderParams(
        image_format=_choose_format(accept),
        window=_parse_window(window) if window else None,
        viewport=_parse_viewport(viewport) if viewport else default_viewport,
        quality=quality if quality is not None else _DEFAULT_QUALITY,
    )


async def _rendered(
    *,
    context: ApiContext,
    request: Request,
    study: str,
    series: str,
    instance: str,
    frame: int,
    params: RenderParams,
) -> Response:
    stored = await find_instance(
        context.pool,
        study,
        series,
        instance,
        elements=PIXEL_ELEMENTS,
        bulk_paths=(*PIXEL_DATA_TAGS, *PALETTE_DATA_TAGS),
    )
    try:
        info = PixelInfo.from_index(stored.transfer_syntax_uid, stored.metadata, stored.bulk_data)
        info.check_frames([frame])
    except (NotAnImageError, FrameNotFoundError) as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    etag = etag_for(stored.content_sha256, "rendered", frame, params)
    if if_none_match_hits(request.headers.get("if-none-match"), etag):
        return not_modified(etag)
    await check_online(context, [(stored.sop_instance_uid, stored.availability)])
    storage = storage_of(context.storage, stored)

    def render() -> bytes:
        [data] = read_frames(storage, stored.key, info, [frame])
        pixels = decode_frame(info, data)
        if info.photometric == "PALETTE COLOR" and info.palette is not None:
            pixels = apply_palette(info, pixels, read_palette(storage, stored.key, info.palette))
        return render_image(info, pixels, params)

    try:
        image = await run_blocking(render, archived=lambda: restoring(context, [stored.sop_instance_uid]))
    except UnsupportedPixelDataError as exc:
        raise HTTPException(status_code=406, detail=str(exc)) from exc
    context.record_access(stored.study_instance_uid, [stored.sop_instance_uid])
    return Response(image, media_type=params.image_format.value, headers=conditional_headers(etag))


def _render_params(default_viewport: tuple[int, int] | None) -> Callable[..., RenderParams]:
    """The dependency reading a rendering request's query parameters."""

    def dependency(
        request: Request,
        window: WindowParam = None,
        viewport: ViewportParam = None,
        quality: QualityParam = None,
        accept: AcceptParam = None,
    ) -> RenderParams:
        return parse_render_params(
            accept=accept or request.headers.get("accept"),
            window=window,
            viewport=viewport,
            quality=quality,
            default_viewport=default_viewport,
        )

    return dependency


Rendered = Annotated[RenderParams, Depends(_render_params(None))]
Thumbnail = Annotated[RenderParams, Depends(_render_params(THUMBNAIL_SIZE))]
Context = Annotated[ApiContext, Depends(get_context)]


def create_router() -> APIRouter:
    router = APIRouter(tags=["WADO-RS"])
    router.include_router(frames.create_router())
    read = [Depends(require(Permission.READ)), Depends(instances_accessed)]

    @router.get(
        INSTANCE_PATH + "/rendered",
        summary="Retrieve the instance rendered (first frame) as JPEG or PNG",
        response_class=Response,
        dependencies=read,
    )
    async def rendered_instance(
        *, study: str, series: str, instance: str, request: Request, context: Context, params: Rendered
    ) -> Response:
        return await _rendered(
            context=context,
            request=request,
            study=study,
            series=series,
            instance=instance,
            frame=1,
            params=params,
        )

    @router.get(
        INSTANCE_PATH + "/thumbnail",
        summary="Retrieve a thumbnail of the instance (first frame, 128 px unless a viewport is given)",
        response_class=Response,
        dependencies=read,
    )
    async def thumbnail_instance(
        *, study: str, series: str, instance: str, request: Request, context: Context, params: Thumbnail
    ) -> Response:
        return await _rendered(
            context=context,
            request=request,
            study=study,
            series=series,
            instance=instance,
            frame=1,
            params=params,
        )

    @router.get(
        INSTANCE_PATH + "/frames/{frame}/rendered",
        summary="Retrieve one frame rendered as JPEG or PNG",
        response_class=Response,
        dependencies=read,
    )
    async def rendered_frame(
        *,
        study: str,
        series: str,
        instance: str,
        frame: int,
        request: Request,
        context: Context,
        params: Rendered,
    ) -> Response:
        return await _rendered(
            context=context,
            request=request,
            study=study,
            series=series,
            instance=instance,
            frame=frame,
            params=params,
        )

    @router.get(
        INSTANCE_PATH + "/frames/{frame}/thumbnail",
        summary="Retrieve a thumbnail of one frame (128 px unless a viewport is given)",
        response_class=Response,
        dependencies=read,
    )
    async def thumbnail_frame(
        *,
        study: str,
        series: str,
        instance: str,
        frame: int,
        request: Request,
        context: Context,
        params: Thumbnail,
    ) -> Response:
        return await _rendered(
            context=context,
            request=request,
            study=study,
            series=series,
            instance=instance,
            frame=frame,
            params=params,
        )

    return router
