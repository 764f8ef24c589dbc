"""``cxrstore ingest``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import finish_run, handle_errors, json_option, parse_key_values, table
from cxrstore.ingest import IngestReport, ingest_dataset


def print_summary(report: IngestReport) -> None:
    click.echo(
        f"ingest {report.model} ({report.encoder}) into {report.store}: "
        f"{report.added} rows added, {report.filled} filled, {report.skipped} skipped as already present, "
        f"{report.failed} failed, in {report.seconds:.1f} s ({report.images_per_second:.1f} images/s)"
    )
    if report.variants:
        click.echo(f"augmentation variants stored beside each original: {', '.join(report.variants)}")
    if report.label_policy_conflicts:
        click.echo(f"{report.label_policy_conflicts} rows were stored earlier under another label policy; "
                   "their labels are kept as stored (see `cxrstore info`)")
    if report.dataset_report and report.dataset_report.get("issues"):
        issues = report.dataset_report["issues"]
        click.echo(f"dataset {report.dataset_report['dataset']}: what was not turned into rows, or was odd:")
        click.echo(table([(i["kind"], i["count"], i["message"], ", ".join(i["examples"][:3])) for i in issues],
                         ["issue", "count", "what", "first examples"]))
    if report.failures:
        shown = report.failures[:20]
        click.echo(table([(f["image_id"] or "-", f["path"] or "-", f["reason"]) for f in shown], ["image_id", "path", "reason"]))
        if len(report.failures) > len(shown):
            click.echo(f"... and {len(report.failures) - len(shown)} more (all kept in the store: `cxrstore info STORE`)")


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="CSV manifest (dataset csv).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Folder the manifest's paths are relative to (default: the manifest's folder).")
@click.option("--dataset", default="csv", show_default=True,
              help="Dataset adapter: csv (a manifest), mimic-cxr-jpg or nih-cxr14 (the dataset's own files under --root).")
@click.option("--encoder", default="baseline", show_default=True, help="Registered encoder name.")
@click.option("--model", help="Model name in the store (default: the encoder's name).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes (default: CPU count; 0: in-process).")
@click.option("--commit-every", default=1024, show_default=True, type=click.IntRange(min=1), help="Rows per commit (a crash loses at most these).")
@click.option("--max-side", default=1024, show_default=True, type=click.IntRange(min=16), help="Uniform preprocessing: longest side after downscaling.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Storage dtype of a new model.")
@click.option("--id-column", default="image_id", show_default=True)
@click.option("--path-column", default="path", show_default=True)
@click.option("--labels", help="Comma-separated label columns (default: every non-canonical column).")
@click.option("--dataset-name", default="csv", show_default=True, help="Value of the dataset column when the manifest has none.")
@click.option("--augment", is_flag=False, flag_value="all", default=None, metavar="[all|NAMES]",
              help="Also store augmented variants of each image: all five (brighter, darker, contrast, rot+45, rot-45) "
                   "or a comma-separated subset.")
@click.option("--labeller", type=click.Choice(["chexpert", "negbio"]), help="mimic-cxr-jpg: label file read [default: chexpert].")
@click.option("--uncertain", type=click.Choice(["exclude", "positive", "negative"]),
              help="mimic-cxr-jpg: what -1.0 (uncertain) means; exclude = missing [default: exclude].")
@click.option("--not-mentioned", type=click.Choice(["negative", "missing"]),
              help="mimic-cxr-jpg: what an empty cell (not mentioned) means [default: negative].")
@click.option("--views", help="mimic-cxr-jpg, nih-cxr14: view positions kept, comma-separated [default: PA,AP].")
@click.option("--nih-opacity-fallback",
              help="nih-cxr14: Opacity for images without the expert 'Airspace opacity' label: "
                   "any-infiltration-consolidation-pneumonia (default) or missing.")
@click.option("--label-map", type=click.Path(dir_okay=False, path_type=Path),
              help="mimic-cxr-jpg, nih-cxr14: harmonised label map JSON [default: schemas/labels-v1.json].")
@click.option("--label-file", type=click.Path(dir_okay=False, path_type=Path),
              help="nih-cxr14: the Data_Entry_2017 label file [default: found under --root].")
@click.option("--patients", type=click.Path(dir_okay=False, path_type=Path),
              help="mimic-cxr-jpg: MIMIC-IV patients.csv.gz for sex and age [default: under --root if present].")
@click.option("--check-images/--no-check-images", default=True, show_default=True,
              help="mimic-cxr-jpg, nih-cxr14: list the image folders and ingest only label rows whose file exists.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path),
              help="Local weights (file or folder) of a foundation-model encoder, e.g. a copy of lion-ai/MedImageInsights.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where the encoder runs [default: the encoder's].")
@click.option("--half", is_flag=True, default=False, help="Run the encoder in half precision (GPU only).")
@click.option("--encoder-batch", type=click.IntRange(min=1), help="Images per model call inside the encoder.")
@click.option("--encoder-option", "encoder_option", multiple=True, metavar="KEY=VALUE",
              help="Another encoder option (repeatable), e.g. output=all_contrastive_img_emb for elixr-v2; "
                   "VALUE is read as JSON when it parses (numbers, true/false), as text otherwise.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@json_option
@handle_errors
def ingest(store: Path, manifest: Path | None, root: Path | None, dataset: str, encoder: str, model: str | None,
           batch_size: int, workers: int | None, commit_every: int, max_side: int, dtype: str, id_column: str,
           path_column: str, labels: str | None, dataset_name: str, augment: str | None, labeller: str | None,
           uncertain: str | None, not_mentioned: str | None, views: str | None, nih_opacity_fallback: str | None,
           label_map: Path | None, label_file: Path | None, patients: Path | None, check_images: bool,
           weights: Path | None, device: str | None, half: bool, encoder_batch: int | None,
           encoder_option: tuple[str, ...], progress: bool | None, as_json: bool) -> None:
    """Embed the images of a dataset into STORE (created if absent).

    Re-running resumes: images already stored with this model are skipped.

    \b
    Examples:
      cxrstore ingest mystore --manifest images.csv --root /data/cxr --encoder baseline
      cxrstore ingest mystore --dataset mimic-cxr-jpg --root /data/mimic-cxr-jpg/2.0.0 \\
          --labeller chexpert --uncertain exclude --not-mentioned negative --views PA,AP
      cxrstore ingest mystore --dataset nih-cxr14 --root /data/nih --augment brighter,rot+45
      cxrstore ingest mystore --manifest images.csv --encoder medimageinsight \\
          --weights /models/MedImageInsights --device cuda --half --batch-size 64
      cxrstore ingest mystore --manifest images.csv --encoder elixr-v2 --weights /models/cxr-foundation \\
          --model elixr-contrastive --encoder-option output=all_contrastive_img_emb
    """
    from cxrstore.io.preprocess import PreprocessConfig

    if dataset == "csv" and manifest is None:
        raise click.UsageError("--manifest is required with --dataset csv")
    options: dict[str, object] = {}
    if dataset == "csv":
        given = {"--labeller": labeller, "--uncertain": uncertain, "--not-mentioned": not_mentioned, "--views": views,
                 "--nih-opacity-fallback": nih_opacity_fallback, "--label-map": label_map, "--label-file": label_file,
                 "--patients": patients}
        stray = [k for k, v in given.items() if v is not None]
        if stray:
            raise click.UsageError(f"{', '.join(stray)} apply to --dataset mimic-cxr-jpg / nih-cxr14, not csv")
        options = {
            "manifest": manifest,
            "root": root,
            "id_column": id_column,
            "path_column": path_column,
            "labels": [s.strip() for s in labels.split(",") if s.strip()] if labels else None,
            "dataset_name": dataset_name,
        }
    elif dataset in ("mimic-cxr-jpg", "nih-cxr14"):
        options = _dataset_options(dataset, root=root, manifest=manifest, labeller=labeller, uncertain=uncertain,
                                   not_mentioned=not_mentioned, views=views, nih_opacity_fallback=nih_opacity_fallback,
                                   label_map=label_map, label_file=label_file, patients=patients, check_images=check_images)
    encoder_options = {k: v for k, v in {"weights": weights, "device": device, "half": half or None,
                                          "batch": encoder_batch}.items() if v is not None}
    for key, value in parse_key_values(encoder_option, "--encoder-option").items():
        if key in encoder_options:
            raise click.UsageError(f"--encoder-option {key}=... repeats an option given by its own flag")
        encoder_options[key] = value
    report = ingest_dataset(
        store,
        dataset=dataset,
        encoder=encoder,
        encoder_options=encoder_options,
        dataset_options=options,
        model=model,
        batch_size=batch_size,
        workers=workers,
        commit_every=commit_every,
        dtype=dtype,
        augment=augment,
        preprocess_config=PreprocessConfig(max_side=max_side),
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    finish_run(report, as_json=as_json, summary=print_summary)


_ONLY = {
    "labeller": ("mimic-cxr-jpg",),
    "uncertain": ("mimic-cxr-jpg",),
    "not_mentioned": ("mimic-cxr-jpg",),
    "patients": ("mimic-cxr-jpg",),
    "nih_opacity_fallback": ("nih-cxr14",),
    "label_file": ("nih-cxr14",),
}


def _dataset_options(dataset: str, *, root: Path | None, manifest: Path | None, check_images: bool,
                     **given: object) -> dict[str, object]:
    """Adapter options from the CLI's; an option of another dataset is a usage error."""
    if root is None:
        raise click.UsageError(f"--root is required with --dataset {dataset} (the folder holding the dataset's own files)")
    if manifest is not None:
        raise click.UsageError(f"--manifest is for --dataset csv; --dataset {dataset} reads the dataset's own files under --root")
    for name, value in given.items():
        if value is not None and name in _ONLY and dataset not in _ONLY[name]:
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} applies to --dataset {', '.join(_ONLY[name])}, not {dataset}")
    options: dict[str, object] = {"root": root, "check_images": check_images}
    names = {"nih_opacity_fallback": "opacity_fallback"}
    for name, value in given.items():
        if value is not None:
            options[names.get(name, name)] = value
    return options
