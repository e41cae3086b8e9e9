//! A hierarchical timer wheel with millisecond resolution.
//!
//! Six levels of 64 slots: level 0 holds timers due within the current 64 ms block, level 1
//! within the current 4.096 s block, and so on up to ~2.2 years. A timer lives in an intrusive
//! doubly-linked list in exactly one slot, so inserting and cancelling are O(1). Advancing time
//! visits only occupied slots (found with a 64-bit occupancy mask per level), so an idle wheel
//! with tens of thousands of far-away timers costs nothing until one is due; a timer is moved
//! at most once per level on its way down ("cascading").
//!
//! Time is a plain `u64` of milliseconds chosen by the caller; the wheel never reads a clock.

use slab::Slab;

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// The furthest deadline from now (later ones are clamped): 63 top slots, never the current one.
const MAX_SPAN: u64 = (1 << (SLOT_BITS * LEVELS as u32)) - (1 << (SLOT_BITS * (LEVELS as u32 - 1)));
const NIL: u32 = u32::MAX;

/// Handle to a scheduled timer. Stale handles (fired or cancelled) are detected and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId {
    key: u32,
    generation: u32,
}

#[derive(Debug)]
struct Entry<T> {
    deadline: u64,
    generation: u32,
    level: u8,
    slot: u8,
    prev: u32,
    next: u32,
    value: T,
}

#[derive(Debug)]
pub struct TimerWheel<T> {
    entries: Slab<Entry<T>>,
    heads: [[u32; SLOTS]; LEVELS],
    occupied: [u64; LEVELS],
    /// The time up to which every due timer has been handed out.
    elapsed: u64,
    next_generation: u32,
}

impl<T> Default for TimerWheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerWheel<T> {
    pub fn new() -> Self {
        TimerWheel {
            entries: Slab::new(),
            heads: [[NIL; SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            elapsed: 0,
            next_generation: 0,
        }
    }

    /// Number of scheduled timers.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Schedules `value` for `deadline` (ms). A deadline in the past fires on the next
    /// [`TimerWheel::expire`].
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerId {
        let deadline = deadline.clamp(self.elapsed, self.elapsed + MAX_SPAN);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let key = self.entries.insert(Entry {
            deadline,
            generation,
            level: 0,
            slot: 0,
            prev: NIL,
            next: NIL,
            value,
        });
        let key = u32::try_from(key).expect("fewer than 4 billion timers");
        self.link(key);
        TimerId { key, generation }
    }

    /// Cancels a timer; returns its value if it was still scheduled.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        match self.entries.get(id.key as usize) {
            Some(e) if e.generation == id.generation => {}
            _ => return None,
        }
        self.unlink(id.key);
        Some(self.entries.remove(id.key as usize).value)
    }

    /// The deadline of a timer still scheduled.
    pub fn deadline(&self, id: TimerId) -> Option<u64> {
        self.entries
            .get(id.key as usize)
            .filter(|e| e.generation == id.generation)
            .map(|e| e.deadline)
    }

    /// The earliest time at which [`TimerWheel::expire`] may have something to hand out.
    /// It can be earlier than the earliest deadline (a higher-level slot has to cascade first).
    pub fn next_wakeup(&self) -> Option<u64> {
        (0..LEVELS).find_map(|level| self.next_in_level(level).map(|(_, at)| at))
    }

    /// Appends the value of every timer whose deadline is at or before `now` to `fired`.
    pub fn expire(&mut self, now: u64, fired: &mut Vec<T>) {
        while let Some((level, slot, at)) = self.next_expiration() {
            if at > now {
                break;
            }
            self.elapsed = self.elapsed.max(at);
            let mut key = std::mem::replace(&mut self.heads[level][slot], NIL);
            self.occupied[level] &= !(1 << slot);
            while key != NIL {
                let e = &mut self.entries[key as usize];
                let next = e.next;
                e.prev = NIL;
                e.next = NIL;
                if e.deadline <= self.elapsed {
                    fired.push(self.entries.remove(key as usize).value);
                } else {
                    // Cascade: re-file relative to the new `elapsed`, on a lower level.
                    self.link(key);
                }
                key = next;
            }
        }
        self.elapsed = self.elapsed.max(now);
    }

    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        (0..LEVELS).find_map(|level| {
            self.next_in_level(level)
                .map(|(slot, at)| (level, slot, at))
        })
    }

    /// The first occupied slot of `level` at or after the current position, and the time its
    /// span starts.
    fn next_in_level(&self, level: usize) -> Option<(usize, u64)> {
        let occupied = self.occupied[level];
        if occupied == 0 {
            return None;
        }
        let shift = SLOT_BITS * level as u32;
        let slot_span = 1u64 << shift;
        let level_span = slot_span << SLOT_BITS;
        let now_slot = ((self.elapsed >> shift) & SLOT_MASK) as u32;
        let distance = occupied.rotate_right(now_slot).trailing_zeros();
        let slot = ((now_slot + distance) % SLOTS as u32) as usize;
        let level_start = self.elapsed & !(level_span - 1);
        let mut at = level_start + slot as u64 * slot_span;
        if at + slot_span <= self.elapsed {
            at += level_span;
        }
        Some((slot, at.max(self.elapsed)))
    }

    fn link(&mut self, key: u32) {
        let deadline = self.entries[key as usize].deadline.max(self.elapsed);
        let level = level_for(self.elapsed, deadline);
        let slot = ((deadline >> (SLOT_BITS * level as u32)) & SLOT_MASK) as usize;
        let head = self.heads[level][slot];
        {
            let e = &mut self.entries[key as usize];
            e.level = level as u8;
            e.slot = slot as u8;
            e.prev = NIL;
            e.next = head;
        }
        if head != NIL {
            self.entries[head as usize].prev = key;
        }
        self.heads[level][slot] = key;
        self.occupied[level] |= 1 << slot;
    }

    fn unlink(&mut self, key: u32) {
        let (level, slot, prev, next) = {
            let e = &self.entries[key as usize];
            (usize::from(e.level), usize::from(e.slot), e.prev, e.next)
        };
        if prev == NIL {
            self.heads[level][slot] = next;
            if next == NIL {
                self.occupied[level] &= !(1 << slot);
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }
}

/// The level whose slots distinguish `deadline` from `elapsed`: the highest 6-bit group in
/// which they differ.
fn level_for(elapsed: u64, deadline: u64) -> usize {
    let differing = (elapsed ^ deadline) | SLOT_MASK;
    let significant = 63 - differing.leading_zeros() as usize;
    (significant / SLOT_BITS as usize).min(LEVELS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expire_at(w: &mut TimerWheel<u32>, now: u64) -> Vec<u32> {
        let mut v = Vec::new();
        w.expire(now, &mut v);
        v.sort_unstable();
        v
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = TimerWheel::new();
        w.insert(10, 1);
        w.insert(100, 2);
        w.insert(5_000, 3);
        w.insert(30_000, 4);
        assert_eq!(expire_at(&mut w, 9), Vec::<u32>::new());
        assert_eq!(expire_at(&mut w, 10), vec![1]);
        assert_eq!(expire_at(&mut w, 99), Vec::<u32>::new());
        assert_eq!(expire_at(&mut w, 4_999), vec![2]);
        assert_eq!(expire_at(&mut w, 5_000), vec![3]);
        assert_eq!(expire_at(&mut w, 29_999), Vec::<u32>::new());
        assert_eq!(expire_at(&mut w, 1_000_000), vec![4]);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn exact_deadlines_across_levels_against_a_model() {
        // Pseudo-random deadlines and step sizes; every timer must fire exactly in the step
        // that first passes its deadline.
        let mut w = TimerWheel::new();
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut model: Vec<(u64, u32)> = Vec::new();
        let mut now = 0u64;
        for i in 0..2_000u32 {
            let d = now + rand() % [10, 1_000, 100_000, 10_000_000][i as usize % 4];
            w.insert(d, i);
            model.push((d, i));
            if i % 7 == 0 {
                now += rand() % 5_000;
                let mut got = Vec::new();
                w.expire(now, &mut got);
                got.sort_unstable();
                let mut want: Vec<u32> = model
                    .iter()
                    .filter(|(d, _)| *d <= now)
                    .map(|(_, v)| *v)
                    .collect();
                want.sort_unstable();
                model.retain(|(d, _)| *d > now);
                assert_eq!(got, want, "at {now}");
                if let Some(at) = w.next_wakeup() {
                    assert!(
                        at > now,
                        "wake-up {at} not after {now}: the loop would spin"
                    );
                }
            }
        }
        let mut got = Vec::new();
        w.expire(u64::MAX / 2, &mut got);
        assert_eq!(got.len(), model.len());
    }

    #[test]
    fn cancel_is_exact_and_stale_ids_are_ignored() {
        let mut w = TimerWheel::new();
        let a = w.insert(50, 1);
        let b = w.insert(50, 2);
        let c = w.insert(50, 3);
        assert_eq!(w.cancel(b), Some(2));
        assert_eq!(w.cancel(b), None);
        assert_eq!(expire_at(&mut w, 50), vec![1, 3]);
        assert_eq!(w.cancel(a), None, "fired timers cannot be cancelled");
        let d = w.insert(60, 4); // may reuse a's slab slot
        assert_eq!(w.cancel(c), None);
        assert_eq!(w.cancel(d), Some(4));
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn next_wakeup_is_never_after_the_earliest_deadline() {
        let mut w = TimerWheel::new();
        assert_eq!(w.next_wakeup(), None);
        w.insert(30_000, 1);
        w.insert(75_000, 2);
        let mut now = 0;
        let mut fired = Vec::new();
        while let Some(at) = w.next_wakeup() {
            assert!(at <= if fired.is_empty() { 30_000 } else { 75_000 });
            assert!(at >= now);
            now = at;
            w.expire(now, &mut fired);
        }
        assert_eq!(fired, vec![1, 2]);
        assert_eq!(now, 75_000);
    }

    #[test]
    fn past_deadlines_fire_on_next_expire() {
        let mut w = TimerWheel::new();
        w.expire(1_000, &mut Vec::new());
        w.insert(10, 7);
        assert_eq!(w.next_wakeup(), Some(1_000));
        assert_eq!(expire_at(&mut w, 1_000), vec![7]);
    }

    #[test]
    fn a_scheduled_timer_tells_its_deadline_and_a_stale_id_tells_none() {
        let mut w = TimerWheel::new();
        let a = w.insert(500, 1);
        let b = w.insert(40, 2);
        assert_eq!(w.deadline(a), Some(500));
        assert_eq!(w.deadline(b), Some(40));
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.deadline(a), None);
        let c = w.insert(700, 3);
        assert_eq!(c.key, a.key, "the slab slot is reused");
        assert_eq!(w.deadline(a), None);
        assert_eq!(w.deadline(c), Some(700));
        assert_eq!(expire_at(&mut w, 40), vec![2]);
        assert_eq!(w.deadline(b), None);
    }

    #[test]
    fn a_stale_id_does_not_cancel_the_timer_that_reused_its_slot() {
        let mut w = TimerWheel::new();
        let a = w.insert(50, 1);
        assert_eq!(w.cancel(a), Some(1));
        let b = w.insert(50, 2);
        assert_eq!(b.key, a.key, "the slab slot is reused");
        assert_eq!(w.cancel(a), None);
        assert_eq!(expire_at(&mut w, 50), vec![2]);
    }

    #[test]
    fn cancelling_the_last_timer_leaves_nothing_to_wake_up_for() {
        let mut w = TimerWheel::new();
        let a = w.insert(50, 1);
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.next_wakeup(), None);
    }

    #[test]
    fn cancelling_a_timer_keeps_the_others_of_its_slot_and_of_other_slots() {
        let mut w = TimerWheel::new();
        w.insert(50, 1);
        let head = w.insert(50, 2);
        let alone = w.insert(60, 3);
        w.insert(70, 4);
        assert_eq!(w.cancel(head), Some(2));
        assert_eq!(w.cancel(alone), Some(3));
        assert_eq!(expire_at(&mut w, 100), vec![1, 4]);
        assert_eq!(w.next_wakeup(), None);
    }

    /// At the top level one slot stands for a whole round of the wheel, so a deadline there
    /// can be a lower slot than now's, to be reached after the wheel wraps.
    #[test]
    fn top_level_timers_fire_in_deadline_order_across_the_wheels_wrap() {
        const TOP_SLOT: u64 = 1 << 30;
        let mut w = TimerWheel::new();
        let now = 10 * TOP_SLOT + 5;
        w.expire(now, &mut Vec::new());
        let near = now + 32 * TOP_SLOT;
        let wrapped = now + 62 * TOP_SLOT;
        w.insert(wrapped, 2);
        w.insert(near, 1);
        let at = w.next_wakeup().unwrap();
        assert!(at > now && at <= near, "wake-up {at}, deadline {near}");
        assert_eq!(expire_at(&mut w, near - 1), Vec::<u32>::new());
        assert_eq!(expire_at(&mut w, near), vec![1]);
        let at = w.next_wakeup().unwrap();
        assert!(
            at > near && at <= wrapped,
            "wake-up {at}, deadline {wrapped}"
        );
        assert_eq!(expire_at(&mut w, wrapped - 1), Vec::<u32>::new());
        assert_eq!(expire_at(&mut w, wrapped), vec![2]);
        assert_eq!(w.len(), 0);
    }

    /// A clamped deadline once landed in the current top-level slot, one round ahead, where
    /// `expire` took it for due and re-filed it into the same slot forever.
    #[test]
    fn deadlines_past_the_wheels_reach_are_clamped_and_fire_there() {
        const TOP_SLOT: u64 = 1 << 30;
        let mut w = TimerWheel::new();
        w.expire(1_000, &mut Vec::new());
        let far = w.insert(u64::MAX, 1);
        let reach = 1_000 + 63 * TOP_SLOT;
        assert_eq!(w.deadline(far), Some(reach));
        let at = w.next_wakeup().unwrap();
        assert!(at > 1_000 && at <= reach, "wake-up {at}, deadline {reach}");
        assert_eq!(expire_at(&mut w, reach - 1), Vec::<u32>::new());
        assert_eq!(expire_at(&mut w, reach), vec![1]);
    }
}
