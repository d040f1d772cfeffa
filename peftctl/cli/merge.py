"""`peftctl merge ADAPTER_DIR --out DIR`: fold an adapter into its base model and write an ordinary model folder.

Progress goes to stderr; the result (where it went, the verification figures, notes) to stdout.
"""

from __future__ import annotations

from pathlib import Path


def run(adapter_dir: str, out: str, *, base: str | None, dtype: str | None, verify: bool, max_shard_size: str,
        from_quantized: str, force: bool, device: str = "auto", trust_remote_code: bool = False) -> int:
    from rich.console import Console

    from peftctl.adapter_folder import read_info
    from peftctl.merge import adapter_folder, merge_adapter
    from peftctl.remote_code import check_pinned, is_refusal, refusal

    console = Console(stderr=True, highlight=False)
    # The adapter's record of trust_remote_code only words the refusal; the command line decides.
    folder = adapter_folder(Path(adapter_dir))
    info = read_info(folder) if folder.is_dir() else {}
    base_name = base or info.get("base_model")
    if base_name:
        check_pinned(base_name, info.get("revision") if base is None else None, trust_remote_code)
    try:
        result = merge_adapter(adapter_dir, out, base=base, dtype=dtype, verify=verify,
                               max_shard_size=max_shard_size, from_quantized=from_quantized, force=force, device=device,
                               report=lambda message: console.print(message, markup=False),
                               trust_remote_code=trust_remote_code)
    except ValueError as e:
        if not is_refusal(e):
            raise
        raise refusal(base_name or adapter_dir, recorded=info.get("trust_remote_code") is True) from None
    print(f"merged {result.method} adapter {result.adapter_dir}")
    print(f"  onto {result.base}" + (f" (revision {result.base_revision})" if result.base_revision else ""))
    print(f"  into {result.out_dir}: {result.shards} shard(s), {result.dtype}, {result.tensors_merged} tensor(s) "
          f"changed, {result.seconds:.1f} s on {result.device}")
    check = result.verification
    if check is None:
        print("  not verified (--no-verify)")
    else:
        print(f"  verified on {check['sequences']} x {check['tokens']} tokens, logits in float32, differences "
              f"relative to the largest logit ({check['logit_scale']:.3g}):")
        print(f"    merged vs {check['reference']}: {check['relative_diff']:.3g} (tolerance {check['tolerance']:.3g}"
              f" for {check['dtype']})")
        if "float32_relative_diff" in check:
            print(f"    the same before rounding to {check['dtype']}: {check['float32_relative_diff']:.3g}; rounding "
                  f"alone: {check['rounding_relative_diff']:.3g}; as written against that rounding: "
                  f"{check['written_relative_diff']:.3g}")
        print(f"    merged vs base: {check['base_relative_diff']:.3g} (the adapter at run time: "
              f"{check['adapter_relative_effect']:.3g})")
    for note in result.notes:
        print(f"  note: {note}")
    return 0
