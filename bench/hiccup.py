"""Hiccup meter: spins for SECONDS reading the monotonic clock and reports every gap over
2 ms, i.e. time this core was not running the loop (another task, or the host taking the
vCPU away). Used by bench/im-numbers.sh to tell host pauses from server pauses."""
import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20
end = time.monotonic() + seconds
last = time.monotonic()
gaps = []
while last < end:
    now = time.monotonic()
    if now - last > 0.002:
        gaps.append((now - last) * 1000)
    last = now
gaps.sort()
print(
    f"gaps_over_2ms={len(gaps)} secs={seconds:g} "
    f"largest_ms={','.join(f'{g:.1f}' for g in gaps[-5:]) or 'none'}"
)
