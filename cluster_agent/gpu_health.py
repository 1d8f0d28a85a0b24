"""Is a GPU fit for a new job? Judged from one telemetry sample plus the critical XIDs seen, as DCGM and the
Kubernetes NVIDIA device plugin judge it. NotSupported is never a verdict: a field a GPU lacks is just absent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["reasons"]

# XIDs caused by applications (illegal address, page faults, ...): not the GPU's fault (device plugin's list).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


def reasons(sample: dict[str, Any], xids: list[int], max_temperature: float) -> list[str]:
    """Why the GPU must not take a new job; empty when it is healthy."""
    found = []
    if sample.get("lost"):
        found.append(f"lost: {sample.get('lost_detail', 'NVML cannot reach the GPU')} (fallen off the bus?)")
    action = sample.get("recovery_action")
    if action and action != "none":
        found.append(f"NVML asks for recovery action: {action}")
    if (sample.get("ecc_volatile_uncorrected") or 0) > 0:
        found.append(f"{sample['ecc_volatile_uncorrected']} volatile uncorrected ECC error(s)")
    if sample.get("remapped_rows_failed"):
        found.append("row remapping failed")
    if sample.get("remapped_rows_pending"):
        found.append("row remapping pending (needs a GPU reset)")
    critical = [x for x in xids if x not in APPLICATION_XIDS]
    if critical:
        found.append(f"critical XID event(s): {', '.join(str(x) for x in sorted(set(critical)))}")
    temperature = sample.get("temperature_c")
    if temperature is not None and temperature > max_temperature:
        found.append(f"temperature {temperature} C over the limit of {max_temperature:g} C")
    return found
