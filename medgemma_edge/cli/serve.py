"""`medgemma-edge serve`: the local OpenAI-compatible server (docs/server.md).

The server package is imported inside the command: `medgemma-edge --help` must work on a machine
without the `serve` extra.
"""

from __future__ import annotations

from pathlib import Path

import click

from medgemma_edge.cli.model_option import model_options, speculative_options

from medgemma_edge.extras import require_extra
from medgemma_edge.node.config import NodeConfig
from medgemma_edge.runtime import spec_choice
from medgemma_edge.runtime.engines import DEFAULT_KV_CACHE, KV_CACHE_HELP, KV_CACHES, check_kv_cache
from medgemma_edge.runtime.errors import InputError

# The defaults live in medgemma_edge/server/config.py; repeated here as literals so that --help
# does not import the server (Starlette) — tests/test_server.py checks the two agree.
DEFAULTS = {"port": 8080, "max_queue": 8, "max_body_mb": 128, "max_images": 128}
NODE = NodeConfig(port=0)  # the node's defaults (node/config.py imports neither Starlette nor pydicom)


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything but loopback needs --api-key-file")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULTS["port"], show_default=True)
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="file whose first line is the key every client must send as 'Authorization: Bearer KEY'")
@click.option("--ssl-certfile", type=click.Path(dir_okay=False), default=None,
              help="serve HTTPS with this PEM certificate (or chain); without it a non-loopback --host warns")
@click.option("--ssl-keyfile", type=click.Path(dir_okay=False), default=None,
              help="the certificate's PEM private key, unencrypted (default: inside --ssl-certfile)")
@click.option("--metrics", is_flag=True, default=False,
              help="answer GET /metrics in Prometheus' text format (under the same key rules as the rest)")
@click.option("--max-queue", type=click.IntRange(min=0), default=DEFAULTS["max_queue"], show_default=True,
              help="requests waiting for the model; more get 429 with Retry-After")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["max_body_mb"],
              show_default=True, help="largest request body (an 85-slice CT series as base64 is ~60 MB)")
@click.option("--max-images", type=click.IntRange(min=1), default=DEFAULTS["max_images"], show_default=True,
              help="most images in one request")
@click.option("--repetition-guard/--no-repetition-guard", default=True, show_default=True,
              help="stop an answer that loops (finish_reason length, medgemma_edge.finish_reason repetition: "
                   "docs/server.md); a request may say otherwise. Not with --upstream: that engine decodes")
@click.option("--self-check/--no-self-check", default=True, show_default=True,
              help="after loading, run the bundle's built-in picture and prompt and compare with the export's "
                   "(one image encode); a mismatch stops the server, exit 2 (docs/export.md#the-self-check)")
@click.option("--idle-unload", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MINUTES",
              help="give the model's memory back after MINUTES without a request or background work; the next "
                   "request loads it again and its answer waits (/health: unloaded, loading; docs/server.md)")
@click.option("--image-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="MEDGEMMA_EDGE_IMAGE_CACHE", show_envvar=True,
              help="also keep image embeddings in this folder (patient-derived data; off by default)")
@click.option("--cors-origin", default=None, help="allow this one browser origin (no CORS headers otherwise)")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="also answer requests addressed to NAME (repeatable; e.g. the name a proxy forwards). "
                   "Without --api-key-file only localhost, 127.0.0.1 and [::1] are answered")
@click.option("--upstream", default=None,
              help="answer with this OpenAI-compatible engine (llama-server, vLLM, Ollama) behind our image path")
@click.option("--upstream-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="file holding the upstream engine's API key, if it wants one")
@click.option("--upstream-model", default=None, help="model name to ask the upstream engine for (Ollama needs one)")
@click.option("--upstream-kind", type=click.Choice(["auto", "llama.cpp", "vllm", "ollama", "openai"]), default="auto",
              show_default=True,
              help="the engine, which decides how structured answers are asked for; auto reads /v1/models "
                   "owned_by (llama.cpp, vllm; ollama also by port 11434; anything else: openai, OpenAI's own "
                   "fields only). A feature the engine cannot honour is refused with a 400")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="default: physical cores")
@click.option("--context", type=click.IntRange(min=256), default=None,
              help="context length in tokens (default: grows to what each prompt needs)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default=DEFAULT_KV_CACHE, show_default=True,
              help=KV_CACHE_HELP)
@speculative_options
@click.option("--dicom-port", type=click.IntRange(0, 65535), default=None,
              help="also run a DICOM node on this port: studies pushed by a PACS or a modality are prepared "
                   "in the background and listed at /v1/studies (docs/node.md)")
@click.option("--dicom-ae", default=NODE.ae_title, show_default=True, help="the node's AE title")
@click.option("--dicom-allow", "dicom_allow", multiple=True, metavar="AE@HOST",
              help="only these senders may store (repeatable); needed when --host is not loopback")
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where received instances are kept (owner-only; default: the cache folder's node-spool)")
@click.option("--spool-gb", type=click.FloatRange(min=0, min_open=True), default=NODE.spool_gb, show_default=True,
              help="spool size limit; a full spool refuses C-STORE with out-of-resources and deletes nothing")
@click.option("--stable-s", type=click.FloatRange(min=0), default=NODE.stable_s, show_default=True,
              help="a study with no new instance for this long is prepared")
@click.option("--prepare", type=click.Choice(["auto", "off"]), default=NODE.prepare, show_default=True,
              help="prepare arrived studies in the background (off: the first question does)")
@click.option("--max-slices", type=click.IntRange(min=1), default=NODE.max_slices, show_default=True,
              help="most slices of a CT/MR series the node prepares (the sampling rule of `ask`); a question "
                   "about a study takes the same")
@click.option("--results-to", default=None, metavar="AE@HOST:PORT",
              help="store answers as draft SRs to this DICOM peer (C-STORE)")
@click.option("--dicomweb", default=None, metavar="URL",
              help="the PACS's DICOMweb root: pull studies not in the spool, and STOW-RS drafts without --results-to")
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="append one JSON line per node event (no patient values) to this file")
def serve(bundle, mmproj, host, port, api_key_file, max_queue, max_body_mb, max_images, image_cache, cors_origin,
          allow_hosts, upstream, upstream_key_file, upstream_model, upstream_kind, threads, context, device,
          dicom_port, dicom_ae, dicom_allow, spool, spool_gb, stable_s, prepare, max_slices, results_to, dicomweb,
          audit_log, ssl_certfile, ssl_keyfile, metrics, repetition_guard, self_check, kv_cache, idle_unload,
          speculative, draft_model):
    """Serve BUNDLE over HTTP: OpenAI's /v1/chat/completions with images and DICOM, and a kiosk page at /.

    The port answers at once; /health says "loading" (and chat answers 503 with Retry-After)
    until the model is loaded. With --dicom-port a DICOM node runs beside it, sharing the model."""
    require_extra("serve", "serve")  # before anything loads: one line, not uvicorn's ImportError
    from medgemma_edge.server.config import ServerConfig, read_api_key

    config = ServerConfig(host=host, port=port, api_key=read_api_key(api_key_file) if api_key_file else None,
                          max_queue=max_queue, max_body_mb=max_body_mb, max_images=max_images,
                          cors_origin=cors_origin, allowed_hosts=allow_hosts, metrics=metrics,
                          ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                          repetition_guard=repetition_guard,
                          idle_unload_min=idle_unload).check()  # before the port opens
    if bundle is None and upstream is None:
        raise InputError("no bundle given — pass -m BUNDLE (a folder made by `medgemma-edge export`), set "
                         "MEDGEMMA_EDGE_MODEL, or pass --upstream URL")
    if idle_unload is not None and upstream is not None:
        raise InputError("--idle-unload gives the local model's memory back; an --upstream engine manages its own "
                         "(llama-server: --sleep-idle-seconds) — leave --idle-unload out")
    node = None
    if dicom_port is not None:
        node = node_config(dicom_port, host, dicom_ae, dicom_allow, spool, spool_gb, stable_s, prepare, max_slices,
                           results_to, dicomweb, audit_log)
        if upstream is not None:
            raise InputError("--dicom-port prepares studies with the local model: give -m BUNDLE, not --upstream")
        if image_cache is None:  # prepared prefixes must outlive the process: they live beside the spool
            image_cache = node.spool_dir / "image-cache"
    upstream_key = read_api_key(upstream_key_file) if upstream_key_file else None
    backend = make_backend(bundle, upstream, threads=threads, context=context, device=device, image_cache=image_cache,
                           upstream_key=upstream_key, upstream_model=upstream_model, upstream_kind=upstream_kind,
                           mmproj=mmproj, self_check=self_check, kv_cache=kv_cache, speculative=speculative,
                           draft_model=draft_model)
    from medgemma_edge.server.runner import serve as run

    run(backend, config, node=node)


def node_config(port, host, ae, allow, spool, spool_gb, stable_s, prepare, max_slices, results_to, dicomweb,
                audit_log):
    """The checked NodeConfig of the `serve` flags (InputError, one line, before any port opens)."""
    from medgemma_edge.node.config import parse_peer

    return NodeConfig(port=port, ae_title=ae, host=host, allow=tuple(parse_peer(p, port=False) for p in allow),
                      spool=spool, spool_gb=spool_gb, stable_s=stable_s, prepare=prepare, max_slices=max_slices,
                      results_to=parse_peer(results_to, port=True) if results_to else None, dicomweb=dicomweb,
                      audit_log=audit_log).check()


def make_backend(bundle, upstream, *, threads=None, context=None, device="auto", image_cache=None,
                 upstream_key=None, upstream_model=None, upstream_kind="auto", mmproj=None, self_check=False,
                 kv_cache=DEFAULT_KV_CACHE, speculative="auto", draft_model=None):
    """The upstream engine, or a loader of the local model. The bundle's manifest and files (names,
    sizes) are checked now, so a bad bundle stops with one line before the port opens; the model
    itself (hashes, weights) loads on the server's worker once the port answers."""
    if upstream is not None:
        from medgemma_edge.server.upstream import UpstreamBackend

        if kv_cache != DEFAULT_KV_CACHE:
            raise InputError("--kv-cache sets the local model's cache; an --upstream engine keeps its own "
                             "(llama-server: --cache-type-k/-v) — leave --kv-cache out")
        if draft_model is not None or speculative == "on":
            raise InputError("--speculative/--draft-model set the local model's decoding; an --upstream engine "
                             "has its own (llama-server: --model-draft) — leave them out")

        return UpstreamBackend(upstream, api_key=upstream_key, model=upstream_model, bundle=bundle, threads=threads,
                               kind=upstream_kind)
    from medgemma_edge.runtime.engines import check_backend
    from medgemma_edge.runtime.gguf_import import open_model_files

    backend = check_backend(*open_model_files(bundle, mmproj, hashes=False))
    check_kv_cache(kv_cache, backend)
    spec_choice.wanted(speculative, draft_model, backend)  # refused before the port opens

    def load():
        import medgemma_edge
        from medgemma_edge.server.backend import LocalBackend

        model = medgemma_edge.load(bundle, device=device, threads=threads, context=context,
                                   image_cache_dir=image_cache, mmproj=mmproj, kv_cache=kv_cache,
                                   speculative=speculative, draft_model=draft_model)
        if model.demo_notice:
            click.echo(f"[{model.demo_notice}]", err=True)
        if self_check:  # before the first answer: a damaged model never serves (BundleError stops the server)
            from medgemma_edge.runtime.selfcheck import check_or_raise, summary

            result = check_or_raise(model, say=lambda line: click.echo(f"self-check: {line}", err=True))
            click.echo(f"self-check: {summary(result)}", err=True)
        return LocalBackend(model)

    return load
