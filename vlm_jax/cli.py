"""`vlm-jax` command line: parse, call one library function, print. No logic lives here."""
from __future__ import annotations

import argparse
import json
import os
import sys

from vlm_jax import config as config_lib
from vlm_jax import cpu_features, host_memory, metrics


TRACEBACK_ENV = "VLM_JAX_TRACEBACK"
# Bad input, reported in one line: anything else (a ValueError from deep in JAX, say) keeps its traceback.
USER_ERRORS = (config_lib.InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _add_set(p: argparse.ArgumentParser, help_text: str) -> None:
  """--set KEY=VALUE ...: every value up to the next option; repeated flags add up (extend, not replace)."""
  p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help=help_text)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
  p.add_argument("--config", required=required,
                 help="config name in configs/ (e.g. shapes_tiny) or a path to a .py file with get_config()")
  _add_set(p, "overrides, e.g. train.stages.align.steps=100 model.decoder.num_layers=2 (--set takes every "
           "KEY=VALUE up to the next option, and may be repeated)")


def _load(args) -> config_lib.Config:
  return config_lib.load(args.config, args.set)


def cmd_config_show(args) -> int:
  cfg = _load(args)
  print(json.dumps(config_lib.to_dict(cfg), indent=2))
  if cfg.model.dtype == "auto":  # on stderr: stdout stays the config's JSON, "auto" as it is saved
    print(cpu_features.describe(cfg.model.dtype), file=sys.stderr)
  return 0


def cmd_train(args) -> int:
  from vlm_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(args.coordinator, args.num_processes, args.process_id, cpu_devices=args.cpu_devices)
  from vlm_jax import init  # pylint: disable=import-outside-toplevel
  from vlm_jax.train import run  # pylint: disable=import-outside-toplevel
  finished = run.run(init.train_config(args.config, args.set, args.workdir), args.workdir, stage=args.stage)
  distributed.shutdown()
  return 0 if finished else distributed.PREEMPTED_EXIT_CODE


def cmd_data_prepare(args) -> int:
  from vlm_jax import datasets  # pylint: disable=import-outside-toplevel
  options = dict(_parse_options(args.set))
  if args.json:
    options["json_path"] = args.json
  if args.image_dir:
    options["image_dir"] = args.image_dir
  if args.parquet:
    options["parquet"] = args.parquet
  if args.format:
    options["format"] = args.format
  report = datasets.prepare(args.name, args.data_dir, **options)
  print(report)
  return 0


def cmd_data_show(args) -> int:
  from vlm_jax.inputs import show  # pylint: disable=import-outside-toplevel
  print(show.show_config_batch(_load(args), split=args.split, stage=args.stage, rows=args.n))
  return 0


def cmd_generate(args) -> int:
  from vlm_jax import generate, workdir  # pylint: disable=import-outside-toplevel
  images = [generate.read_image(p) for p in args.image]  # bad paths fail before the model loads
  generator = generate.Generator(*workdir.load(args.workdir, args.stage))
  result = generator.generate([(images, args.prompt)],
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, raw=args.raw)[0]
  print(json.dumps({"text": result.text, "token_ids": result.token_ids}) if args.json else result.text)
  return 0


def cmd_serve(args) -> int:
  from vlm_jax.serve import api  # pylint: disable=import-outside-toplevel
  api.serve(args.workdir, args.stage, host=args.host, port=args.port, slots=args.slots, max_images=args.max_images,
            allow_local_files=args.allow_local_files)
  return 0


def cmd_eval(args) -> int:
  from vlm_jax import evaluate  # pylint: disable=import-outside-toplevel
  results = evaluate.evaluate(args.workdir, split=args.split, limit=args.limit, batch_size=args.batch_size,
                              data_dir=args.data_dir, stage=args.stage, dataset=args.dataset, metric=args.metric,
                              answer_tokens=args.max_new_tokens)
  print(evaluate.format_table(results))
  print(f"results: {evaluate.results_path(args.workdir)}")
  print(f"answers: {evaluate.predictions_path(args.workdir)}")
  return 0


def cmd_export(args) -> int:
  from vlm_jax.convert import export  # pylint: disable=import-outside-toplevel
  part = "adapter" if args.adapter else "base" if args.base else "merged"
  out = export.export_workdir(args.workdir, args.out, stage=args.stage, dtype=args.dtype, fmt=args.format, part=part)
  print(f"exported to {out}")
  return 0


def cmd_import_hf(args) -> int:
  from vlm_jax.convert import load  # pylint: disable=import-outside-toplevel
  cfg = load.import_hf(args.hf_dir, args.workdir, adapter=args.adapter)
  print(f"imported {args.hf_dir} into {args.workdir} (stage 'import'; vision {cfg.model.vision.kind}, "
        f"projector {cfg.model.projector.kind}, decoder {cfg.model.decoder.num_layers} layers)")
  return 0


def cmd_init(args) -> int:
  from vlm_jax import init  # pylint: disable=import-outside-toplevel
  cfg = init.init(args.config, args.workdir, args.vision, args.decoder, args.set)
  print(f"initialised {args.workdir} (stage '{init.INIT_STAGE}'; vision {cfg.model.vision.kind} from {args.vision}, "
        f"fresh {cfg.model.projector.kind} projector, decoder from {args.decoder}); train it with "
        f"`vlm-jax train --config {args.config} --workdir {args.workdir}`")
  return 0


def cmd_demo(args) -> int:
  from vlm_jax import demo  # pylint: disable=import-outside-toplevel
  demo.run_demo(args.config, args.workdir, args.set, limit=args.limit, export=not args.no_export)
  return 0


def cmd_aot(args) -> int:
  from vlm_jax import aot  # pylint: disable=import-outside-toplevel
  return aot.main(_load(args), args.topology, stage_name=args.stage, batch_size=args.batch_size,
                  seq_len=args.seq_len, roofline=args.roofline)


def cmd_bench(args) -> int:
  from vlm_jax import bench  # pylint: disable=import-outside-toplevel
  loader = (dict(stage=args.stage, hosts=args.hosts, batches=args.batches, step_seconds=args.step_seconds)
            if args.loader else None)
  return bench.main(_load(args), compare_torch=args.compare_torch, json_out=args.json, quick=args.quick,
                    serve=args.serve, loader=loader)


def _parse_options(items: list[str]) -> list[tuple[str, object]]:
  out = []
  for item in items:
    if "=" not in item:
      raise config_lib.ConfigError(f"Option {item!r} must look like key=value, e.g. num_train=1000.")
    key, text = item.split("=", 1)
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = text
    out.append((key, value))
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="vlm-jax", description="vlm-jax: train LLaVA-style vision-language models with JAX/Flax "
                                   "on a device mesh, evaluate them and export them to transformers.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="run a config's training stages in order (resumes; skips finished stages)")
  _add_config_args(p)
  p.add_argument("--workdir", required=True, help="output dir (local or gs://): checkpoints, metrics, tokenizer")
  p.add_argument("--stage", default=None, help="run only this stage (default: all, in order)")
  p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="multi-process run outside TPU VMs: process 0's address (TPU VMs find it themselves)")
  p.add_argument("--num-processes", type=int, default=None, help="with --coordinator: processes in the run")
  p.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process, 0..N-1")
  p.add_argument("--cpu-devices", type=int, default=None, help="give the CPU backend N devices (testing meshes)")
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser("generate", help="answer a prompt about images with a trained workdir's model")
  p.add_argument("--workdir", required=True, help="a training workdir (config.json, tokenizer/, stage checkpoints)")
  p.add_argument("--stage", default=None, help="stage whose params to use (default: the last finished one)")
  p.add_argument("--image", action="append", default=[], help="an image file; repeat for several, in order")
  p.add_argument("--prompt", required=True, help="the user turn; <image> marks where images go (default: first)")
  p.add_argument("--raw", action="store_true", help="use the prompt verbatim, without the chat template")
  p.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
  p.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser("serve", help="serve a workdir's model: OpenAI-compatible chat API with images and streaming "
                     "(continuous batching), and a chat page at /")
  p.add_argument("--workdir", required=True, help="a training workdir (config.json, tokenizer/, stage checkpoints)")
  p.add_argument("--stage", default=None, help="stage whose params to use (default: the last finished one)")
  p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s; 0.0.0.0 listens on every interface)")
  p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
  p.add_argument("--slots", type=int, default=4, help="requests decoded together (default: %(default)s)")
  p.add_argument("--max-images", type=int, default=4, help="images per conversation (default: %(default)s)")
  p.add_argument("--allow-local-files", action="store_true",
                 help="accept image urls that are paths on this machine (file://... or /path)")
  p.set_defaults(fn=cmd_serve)

  p = sub.add_parser("eval", help="scores per question type and source (VQAv2 accuracy, ANLS, relaxed accuracy or "
                     "exact match), blind baseline and caption F1 of a workdir")
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", default=None, help="stage whose params to use (default: the last finished one)")
  p.add_argument("--split", default="test", help="(default: %(default)s)")
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
  p.add_argument("--batch-size", type=int, default=16, help="requests per generate call (default: %(default)s)")
  p.add_argument("--data-dir", default=None, help="TFDS data dir (default: the config's data.data_dir)")
  p.add_argument("--dataset", default=None, help="prepared dataset to score, e.g. hf_parquet/vqav2 (default: the "
                 "first dataset of the config's last conversation stage)")
  p.add_argument("--metric", default="auto", choices=("auto",) + metrics.METRICS,
                 help=f"how answers are scored against the references; auto: {metrics.AUTO_HELP}")
  p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default: %(default)s)")
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("export", help="write a workdir's model as a transformers directory (LLaVA or Idefics3)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="output directory (local)")
  p.add_argument("--stage", default=None, help="stage whose params to export (default: the last finished)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="weights' dtype in the export (default: %(default)s)")
  p.add_argument("--format", default="hf", choices=("hf", "torch"),
                 help="hf: transformers directory with processor; torch: plain state_dict + name map "
                 "(default: %(default)s)")
  lora_part = p.add_mutually_exclusive_group()  # a LoRA stage exports merged unless one of these is given
  lora_part.add_argument("--adapter", action="store_true",
                         help="LoRA stage: write its adapters as a PEFT directory (adapter_config.json, "
                         "adapter_model.safetensors) for peft.PeftModel.from_pretrained(base, OUT)")
  lora_part.add_argument("--base", action="store_true",
                         help="LoRA stage: write the model without its adapters (the base the --adapter export "
                         "applies to)")
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser("import-hf", help="turn a transformers LLaVA / Idefics3 directory into a vlm_jax workdir")
  p.add_argument("--hf-dir", required=True, help="local directory with config.json, *.safetensors, tokenizer")
  p.add_argument("--workdir", required=True)
  p.add_argument("--adapter", default=None,
                 help="a PEFT LoRA directory of this base (adapter_config.json, adapter_model.safetensors): merged "
                 "into the imported weights")
  p.set_defaults(fn=cmd_import_hf)

  p = sub.add_parser("init", help="compose a VLM workdir from a HF vision tower and a HF causal LM (new projector)")
  _add_config_args(p)
  p.add_argument("--workdir", required=True, help="output dir (local or gs://); train it with the same --config")
  p.add_argument("--vision", required=True, help="SiglipVisionModel / SiglipModel / CLIPVisionModel / CLIPModel "
                 "directory (local or gs://: config.json, *.safetensors, preprocessor_config.json)")
  p.add_argument("--decoder", required=True, help="LlamaForCausalLM directory (local or gs://: config.json, "
                 "*.safetensors, tokenizer.json)")
  p.set_defaults(fn=cmd_init)

  p = sub.add_parser("demo", help="the main job: prepare shapes_vqa, train all stages, evaluate, generate, export")
  p.add_argument("--config", default="shapes_tiny", help="config name in configs/ or a .py path (default: %(default)s)")
  _add_set(p, "config overrides, e.g. train.stages.instruct.steps=400")
  p.add_argument("--workdir", default="runs/demo",
                 help="output dir; re-running resumes and skips finished stages (default: %(default)s)")
  p.add_argument("--limit", type=int, default=None, help="evaluate on at most this many test records")
  p.add_argument("--no-export", action="store_true", help="skip the transformers export step")
  p.set_defaults(fn=cmd_demo)

  p = sub.add_parser("aot", help="compile the train step for a TPU topology on this machine (needs the tpu "
                     "extra, no TPU); print per-chip HBM, FLOPs and a roofline bound; exit 1 if it does not fit")
  _add_config_args(p)
  p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:2x4, v5p:2x2x2, v4:2x2x2, v6e:2x4")
  p.add_argument("--stage", default=None, help="stage to compile (default: the last)")
  p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the stage's)")
  p.add_argument("--seq-len", type=int, default=None,
                 help="tokens per row (default: the stage's row length: its seq_len, else data.seq_len)")
  p.add_argument("--roofline", default="auto", choices=("auto", "unscanned", "extrapolate", "none"),
                 help="how XLA's whole-step cost is found for the HLO roofline: an unscanned compile, or unscanned "
                 "2- and 4-layer compiles extrapolated (cheap for big models); auto: the compile itself when the "
                 "config is unscanned, else extrapolate")
  p.set_defaults(fn=cmd_aot)

  p = sub.add_parser("bench", help="time the train step and generation against this machine's matmul peak (MFU) "
                     "and, with --compare-torch, against transformers on the same exported model; print a table")
  _add_config_args(p)
  p.add_argument("--compare-torch", action="store_true",
                 help="also export the model to transformers and time its train step and generate (f32, bf16)")
  p.add_argument("--json", default=None, metavar="OUT", help="write every number to this JSON file")
  p.add_argument("--quick", action="store_true",
                 help="for tests: few repeats, the config's dtype and shape only (no scaling sweep), 48 new "
                 "tokens; compile times may be persistent-cache hits")
  p.add_argument("--serve", action="store_true",
                 help="instead: the serving engine under 1, 4 and 16 concurrent clients (output tokens/s, time to "
                 "first token) against transformers' generate called per request")
  p.add_argument("--loader", action="store_true",
                 help="instead: one host's input pipeline (records/s, rows/s, tiles/s) against the step it feeds")
  p.add_argument("--stage", default=None, help="--loader: the stage whose loader to time (default: the last)")
  p.add_argument("--hosts", type=int, default=1,
                 help="--loader: hosts feeding distinct rows (feed groups); each makes batch_size / hosts rows")
  p.add_argument("--batches", type=int, default=8, help="--loader: host batches timed after the first")
  p.add_argument("--step-seconds", type=float, default=None,
                 help="--loader: the step time to compare with (e.g. roofline_seconds of `vlm-jax aot`)")
  p.set_defaults(fn=cmd_bench)

  p = sub.add_parser("config", help="config tools")
  csub = p.add_subparsers(dest="config_command", required=True)
  q = csub.add_parser("show", help="print the resolved config (after --set overrides) as JSON")
  q.add_argument("config", help="config name or path")
  _add_set(q, "overrides; put --set after the name")
  q.set_defaults(fn=cmd_config_show)

  p = sub.add_parser("data", help="dataset tools: prepare, show")
  dsub = p.add_subparsers(dest="data_command", required=True)
  q = dsub.add_parser("prepare", help="prepare a TFDS builder (shapes_vqa, llava_json, hf_parquet) into --data-dir")
  q.add_argument("name", help="shapes_vqa, shapes_vqa/CONFIG (e.g. shapes_vqa/tiny), llava_json (with --json) or "
                 "hf_parquet[/NAME] (with --parquet)")
  q.add_argument("--data-dir", required=True, help="TFDS data dir (local or gs://)")
  _add_set(q, "builder options, e.g. num_train=20000 seed=0 (shapes_vqa)")
  q.add_argument("--json", default=None, help="llava_json: the LLaVA-format JSON file")
  q.add_argument("--image-dir", default=None, help="llava_json: folder the JSON's image paths are relative to")
  q.add_argument("--parquet", default=None, metavar="GLOB",
                 help="hf_parquet: the Hub download's shards, e.g. 'DIR/data/*.parquet' (quoted; local or gs://); "
                 "one split per file prefix (train-00000-of-00002.parquet -> train)")
  q.add_argument("--format", default=None, choices=("trl", "cauldron", "vqa"),
                 help="hf_parquet: trl (messages + images), cauldron (images + texts), vqa (a table: --set "
                 "image=COL question=COL answer=COL or answers=COL, source=NAME; default: from the columns)")
  q.set_defaults(fn=cmd_data_prepare)
  q = dsub.add_parser("show", help="print what the model sees for a few batch rows")
  _add_config_args(q)
  q.add_argument("--split", default="train", help="(default: %(default)s)")
  q.add_argument("--stage", default=None, help="stage whose task/datasets to use (default: the last stage)")
  q.add_argument("-n", type=int, default=2, help="rows to show (default: %(default)s)")
  q.set_defaults(fn=cmd_data_show)
  return parser


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the `vlm-jax` command itself, not a call from Python
    host_memory.reexec_tuned()
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except config_lib.ConfigError as e:
    print(f"vlm-jax: config error: {e}", file=sys.stderr)
    return 2
  except USER_ERRORS as e:  # exit 2 like a usage error (aot's 1 means "does not fit")
    if os.environ.get(TRACEBACK_ENV):
      raise
    command = " ".join(c for c in (args.command, getattr(args, f"{args.command}_command", None)) if c)
    print(f"vlm-jax {command}: {type(e).__name__}: {e}\n({TRACEBACK_ENV}=1 shows where it was raised)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
