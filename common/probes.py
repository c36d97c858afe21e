"""The probes vLLM-compatible tools send (guidellm, the vLLM benchmark scripts, SageMaker-style
load balancers): `GET /health` (200, empty body), `GET|POST /ping` (200, empty body) and
`GET /version` (`{"version": ...}`). A part registers the blueprint next to its own `/healthz`;
common.gate serves these paths on threads of their own."""
from __future__ import annotations

from importlib import metadata

from flask import Blueprint, Response, jsonify


def _version() -> str:
    try:
        return metadata.version("saxplane")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def vllm_probes() -> Blueprint:
    bp = Blueprint("vllm_probes", __name__)
    version = _version()

    @bp.get("/health")
    def health() -> Response:
        return Response(status=200)

    @bp.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        return Response(status=200)

    @bp.get("/version")
    def version_route() -> Response:
        return jsonify({"version": version})

    return bp
