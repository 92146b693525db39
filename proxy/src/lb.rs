//! Load balancers: which endpoint of a cluster serves a request. One
//! [`Balancer`] is built per endpoint set (a snapshot or a DNS refresh) and
//! then read concurrently by every request. It owns the priority failover
//! (Envoy's overprovisioning factor and panic threshold), locality weighting,
//! and the policies round robin (weighted), least request (power of `n`
//! choices, or peak EWMA as an opt-in), random, ring hash and maglev, plus
//! the request hash those two consume ([`request_hash`], from the route's
//! hash policies). Endpoints that outlier detection ejected are skipped by
//! every policy; hash policies walk on to the next endpoint of the ring or
//! table, so that only the keys of the ejected endpoint move.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_model::LbPolicy;
use ferry_model::cluster::{HashPolicy, HashPolicyKind, LbConfig};
use http::{HeaderMap, HeaderValue, Uri};

/// What a balancer needs to know about an endpoint at pick time.
pub trait LbHost {
    /// A stable identity (the address) placing the host on rings and tables.
    fn id(&self) -> String;
    /// Not ejected by outlier detection nor failed by active health checks.
    fn available(&self) -> bool;
    /// Degraded by its active health check (`x-envoy-degraded`): used only
    /// while no healthy host of its priority is left, as EDS's DEGRADED.
    fn degraded(&self) -> bool {
        false
    }
    /// Excluded after `x-envoy-immediate-health-check-fail`: never picked,
    /// not even in panic mode (Envoy's `EXCLUDED_VIA_IMMEDIATE_HC_FAIL`).
    fn excluded(&self) -> bool {
        false
    }
    /// Requests in flight (least request).
    fn active(&self) -> u64;
    /// Peak-EWMA latency estimate in nanoseconds (opt-in least request).
    fn latency_cost(&self) -> f64 {
        0.0
    }
    /// How long the host has been in the cluster (slow start); `None`: as
    /// long as can matter.
    fn age(&self) -> Option<std::time::Duration> {
        None
    }
}

/// An endpoint's place in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMeta {
    pub weight: u32,
    pub priority: u32,
    pub locality: u32,
    pub locality_weight: u32,
    /// DEGRADED in EDS: used only while no healthy endpoint of its priority
    /// is available.
    pub degraded: bool,
    /// UNHEALTHY (or draining) in EDS: no traffic outside panic mode.
    pub unhealthy: bool,
}

impl Default for HostMeta {
    fn default() -> Self {
        Self {
            weight: 1,
            priority: 0,
            locality: 0,
            locality_weight: 1,
            degraded: false,
            unhealthy: false,
        }
    }
}

/// Longest weighted round-robin sequence; larger weight sums are scaled down.
const MAX_SEQUENCE: u64 = 4096;

/// The endpoint choice for one endpoint set.
pub struct Balancer<H> {
    policy: LbPolicy,
    cfg: LbConfig,
    hosts: Vec<H>,
    degraded: Vec<bool>,
    unhealthy: Vec<bool>,
    levels: Vec<Level>,
}

/// The endpoints of one priority.
struct Level {
    members: Vec<usize>,
    /// Endpoints grouped by locality (one group when locality weighting is off).
    groups: Vec<Group>,
    ring: Vec<(u64, usize)>,
    maglev: Vec<usize>,
}

struct Group {
    locality_weight: u32,
    members: Vec<usize>,
    /// The configured weight of each member (same order).
    weights: Vec<u32>,
    /// Host indexes interleaved by weight (smooth weighted round robin), so
    /// that a plain counter walks them in proportion and without bursts.
    /// Empty when the weights are all equal: the sequence is then the
    /// members themselves, not kept twice (a mesh's clusters hold a hundred
    /// thousand endpoints, nearly all of equal weight).
    sequence: Vec<usize>,
    next: AtomicUsize,
}

impl<H: LbHost> Balancer<H> {
    pub fn new(policy: LbPolicy, cfg: &LbConfig, hosts: Vec<(H, HostMeta)>) -> Self {
        let metas: Vec<HostMeta> = hosts.iter().map(|(_, m)| *m).collect();
        let hosts: Vec<H> = hosts.into_iter().map(|(h, _)| h).collect();
        let mut priorities: Vec<u32> = metas.iter().map(|m| m.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let levels = priorities
            .into_iter()
            .map(|p| {
                let members: Vec<usize> = (0..hosts.len())
                    .filter(|i| metas.get(*i).is_some_and(|m| m.priority == p))
                    .collect();
                let groups = if cfg.locality_weighted {
                    let mut locs: Vec<u32> = members
                        .iter()
                        .filter_map(|i| metas.get(*i).map(|m| m.locality))
                        .collect();
                    locs.sort_unstable();
                    locs.dedup();
                    locs.into_iter()
                        .map(|l| {
                            let ms: Vec<usize> = members
                                .iter()
                                .copied()
                                .filter(|i| metas.get(*i).is_some_and(|m| m.locality == l))
                                .collect();
                            let w = ms
                                .first()
                                .and_then(|i| metas.get(*i))
                                .map_or(1, |m| m.locality_weight);
                            Group::new(ms, w, &metas)
                        })
                        .collect()
                } else {
                    vec![Group::new(members.clone(), 1, &metas)]
                };
                let ring = if policy == LbPolicy::RingHash {
                    build_ring(&hosts, &metas, &members, cfg)
                } else {
                    Vec::new()
                };
                let maglev = if policy == LbPolicy::Maglev {
                    build_maglev(&hosts, &metas, &members, cfg.maglev_table_size)
                } else {
                    Vec::new()
                };
                Level {
                    members,
                    groups,
                    ring,
                    maglev,
                }
            })
            .collect();
        Self {
            policy,
            cfg: cfg.clone(),
            degraded: metas.iter().map(|m| m.degraded).collect(),
            unhealthy: metas.iter().map(|m| m.unhealthy).collect(),
            hosts,
            levels,
        }
    }

    pub fn hosts(&self) -> &[H] {
        &self.hosts
    }

    /// Chooses an endpoint; `hash` is the request's hash for ring hash and
    /// maglev (without one they pick at random, as Envoy does).
    pub fn pick(&self, hash: Option<u64>) -> Option<&H> {
        self.pick_filtered(hash, &|_| false)
    }

    /// [`Balancer::pick`] for a retry that should avoid hosts already
    /// tried (`skip`): the same policy and hash, walking on past skipped
    /// hosts — a ring hash request moves to the next host on the ring, as
    /// Envoy's reselection does. When every candidate is skipped the plain
    /// choice stands.
    pub fn pick_except(&self, hash: Option<u64>, skip: &dyn Fn(&H) -> bool) -> Option<&H> {
        self.pick_filtered(hash, skip)
            .or_else(|| self.pick_filtered(hash, &|_| false))
    }

    fn pick_filtered(&self, hash: Option<u64>, skip: &dyn Fn(&H) -> bool) -> Option<&H> {
        let (level, panic) = self.choose_level(hash)?;
        let up = |i: usize| self.up(i);
        let is_degraded = |i: usize| {
            self.degraded.get(i).copied().unwrap_or(false)
                || self.hosts.get(i).is_some_and(|h| h.degraded())
        };
        let healthy_left = level.members.iter().any(|i| up(*i) && !is_degraded(*i));
        let skipped = |i: usize| self.hosts.get(i).is_some_and(|h| skip(h) || h.excluded());
        let ok = |i: usize| !skipped(i) && (panic || (up(i) && (!healthy_left || !is_degraded(i))));
        let idx = match self.policy {
            LbPolicy::RingHash => ring_lookup(&level.ring, hash.unwrap_or_else(rand::random), ok),
            LbPolicy::Maglev => maglev_lookup(&level.maglev, hash.unwrap_or_else(rand::random), ok),
            LbPolicy::Random => {
                let g = self.choose_group(level, &ok)?;
                let n = g.sequence().len();
                let start = rand::random_range(0..n.max(1));
                (0..n)
                    .filter_map(|k| g.sequence().get((start + k) % n).copied())
                    .find(|i| ok(*i))
            }
            LbPolicy::LeastRequest => {
                let g = self.choose_group(level, &ok)?;
                self.least_request(g, &ok)
            }
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided => {
                let g = self.choose_group(level, &ok)?;
                if let Some(i) = self.slow_start_pick(g, &ok) {
                    return self.hosts.get(i);
                }
                let n = g.sequence().len();
                let start = g.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .filter_map(|k| g.sequence().get((start + k) % n).copied())
                    .find(|i| ok(*i))
            }
        }?;
        self.hosts.get(idx)
    }

    /// Excluded from balancing (`LbHost::excluded`): not counted among a
    /// level's or a locality's hosts either, as Envoy leaves excluded hosts
    /// out of the denominator of priority spill-over, locality weighting and
    /// panic mode.
    fn excluded(&self, i: usize) -> bool {
        self.hosts.get(i).is_some_and(|h| h.excluded())
    }

    /// Healthy in EDS and not ejected.
    fn up(&self, i: usize) -> bool {
        !self.unhealthy.get(i).copied().unwrap_or(false)
            && self.hosts.get(i).is_some_and(|h| h.available())
    }

    /// Envoy's priority load: each level takes up to its available share ×
    /// the overprovisioning factor, the rest spills to the next level.
    fn choose_level(&self, hash: Option<u64>) -> Option<(&Level, bool)> {
        let factor = u64::from(self.cfg.overprovisioning_factor);
        let health: Vec<u64> = self
            .levels
            .iter()
            .map(|l| {
                let counted = l.members.iter().filter(|i| !self.excluded(**i));
                let (total, up) = counted.fold((0u64, 0u64), |(t, u), i| {
                    (t + 1, u + u64::from(self.up(*i)))
                });
                (factor * up).checked_div(total).unwrap_or(0).min(100)
            })
            .collect();
        let sum: u64 = health.iter().sum::<u64>().min(100);
        // Below `healthy_panic_threshold` (Envoy's default 50 %) the balancer
        // ignores availability: overloading the few left would be worse than
        // trying every endpoint. A threshold of 0 turns panic mode off.
        if (sum as f64) < self.cfg.healthy_panic_threshold {
            return self
                .levels
                .iter()
                .find(|l| !l.members.is_empty())
                .map(|l| (l, true));
        }
        if sum == 0 {
            return None;
        }
        // Scale the loads up when the levels together offer less than 100 %.
        let roll = hash.map_or_else(|| rand::random_range(0..sum), |h| h % sum);
        let mut acc = 0;
        for (l, h) in self.levels.iter().zip(&health) {
            acc += (*h).min(100 - (acc.min(100)));
            if roll < acc {
                return Some((l, false));
            }
        }
        self.levels.last().map(|l| (l, false))
    }

    /// Locality weighting: a locality's weight scaled by its available share.
    fn choose_group<'a>(&self, level: &'a Level, ok: &dyn Fn(usize) -> bool) -> Option<&'a Group> {
        if level.groups.len() <= 1 {
            return level.groups.first();
        }
        let factor = u64::from(self.cfg.overprovisioning_factor);
        let eff: Vec<u64> = level
            .groups
            .iter()
            .map(|g| {
                let total = g
                    .members
                    .iter()
                    .filter(|i| !self.excluded(**i))
                    .count()
                    .max(1) as u64;
                let up = g.members.iter().filter(|i| ok(**i)).count() as u64;
                u64::from(g.locality_weight) * (factor * up / total).min(100)
            })
            .collect();
        let sum: u64 = eff.iter().sum();
        if sum == 0 {
            return level.groups.first();
        }
        let mut roll = rand::random_range(0..sum);
        for (g, w) in level.groups.iter().zip(eff) {
            if roll < w {
                return Some(g);
            }
            roll -= w;
        }
        level.groups.last()
    }

    /// Power of `choice_count` choices: sample that many endpoints (in
    /// proportion to their weights) and keep the least loaded.
    fn least_request(&self, g: &Group, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = g.sequence().len();
        if n == 0 {
            return None;
        }
        let mut best: Option<(f64, usize)> = None;
        for _ in 0..self.cfg.choice_count.max(2) {
            // Hosts are sampled in proportion to their weights, scaled by
            // their slow-start factor while some host ramps up.
            let i = match self.slow_start_pick(g, ok) {
                Some(i) => i,
                None => {
                    let start = rand::random_range(0..n);
                    (0..n)
                        .filter_map(|k| g.sequence().get((start + k) % n).copied())
                        .find(|i| ok(*i))?
                }
            };
            let Some(h) = self.hosts.get(i) else { continue };
            let weight = g.weight_of(i).max(1) as f64 * self.slow_start_factor(h);
            let load = if self.cfg.peak_ewma {
                h.latency_cost().max(1.0) * (h.active() + 1) as f64
            } else {
                // Envoy weighs a host by weight / active^bias.
                let active = h.active() as f64;
                let bias = self.cfg.active_request_bias;
                let active = if bias == 1.0 {
                    active
                } else {
                    active.powf(bias)
                };
                active / weight
            };
            if best.is_none_or(|(b, _)| load < b) {
                best = Some((load, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

impl<H: LbHost> Balancer<H> {
    /// A host's slow-start factor (1.0 outside the window, or without slow
    /// start).
    fn slow_start_factor(&self, h: &H) -> f64 {
        match (&self.cfg.slow_start, h.age()) {
            (Some(s), Some(age)) => s.factor(age),
            _ => 1.0,
        }
    }

    /// Round robin while some host is in its slow-start window: a pick in
    /// proportion to each host's weight scaled by its factor, as Envoy's
    /// EDF scheduler gives them; `None` when no host is in the window (the
    /// plain sequence applies).
    fn slow_start_pick(&self, g: &Group, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        self.cfg.slow_start.as_ref()?;
        let factors: Vec<f64> = g
            .members
            .iter()
            .map(|i| {
                self.hosts
                    .get(*i)
                    .map_or(1.0, |h| self.slow_start_factor(h))
            })
            .collect();
        if factors.iter().all(|f| *f >= 1.0) {
            return None;
        }
        let eff: Vec<(usize, f64)> = g
            .members
            .iter()
            .zip(&g.weights)
            .zip(&factors)
            .filter(|((i, _), _)| ok(**i))
            .map(|((i, w), f)| (*i, f64::from(*w) * f))
            .collect();
        let total: f64 = eff.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return None;
        }
        let mut roll = rand::random::<f64>() * total;
        for (i, w) in &eff {
            if roll < *w {
                return Some(*i);
            }
            roll -= w;
        }
        eff.last().map(|(i, _)| *i)
    }
}

impl Group {
    fn new(members: Vec<usize>, locality_weight: u32, metas: &[HostMeta]) -> Self {
        let weights: Vec<u32> = members
            .iter()
            .map(|i| metas.get(*i).map_or(1, |m| m.weight.max(1)))
            .collect();
        let equal = weights.windows(2).all(|w| w[0] == w[1]);
        let wide: Vec<u64> = weights.iter().map(|w| u64::from(*w)).collect();
        Self {
            sequence: if equal {
                Vec::new()
            } else {
                smooth_sequence(&members, &wide)
            },
            members,
            weights,
            locality_weight,
            next: AtomicUsize::new(0),
        }
    }

    /// The round-robin sequence (see [`Group::sequence`]).
    fn sequence(&self) -> &[usize] {
        if self.sequence.is_empty() {
            &self.members
        } else {
            &self.sequence
        }
    }

    fn weight_of(&self, i: usize) -> usize {
        self.sequence().iter().filter(|x| **x == i).count()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// nginx's smooth weighted round robin unrolled into one period.
fn smooth_sequence(members: &[usize], weights: &[u64]) -> Vec<usize> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_SEQUENCE {
        w = w
            .iter()
            .map(|x| (x * MAX_SEQUENCE / total).max(1))
            .collect();
    }
    let total: u64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, x) in current.iter_mut().zip(&w) {
            *c += *x as i64;
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(k, c)| (**c, -(*k as i64)))
        else {
            break;
        };
        if let Some(c) = current.get_mut(best) {
            *c -= total as i64;
        }
        if let Some(m) = members.get(best) {
            out.push(*m);
        }
    }
    out
}

/// Envoy's ring: every host gets points in proportion to its weight, the
/// ring holding at least `minimum_ring_size` and at most `maximum_ring_size`
/// points; a point is the XXH64 of `address_n`. The points are dealt from
/// running sums over the hosts in order, as Envoy deals them, so the same
/// endpoints give the same ring, and a key the same host, in both.
fn build_ring<H: LbHost>(
    hosts: &[H],
    metas: &[HostMeta],
    members: &[usize],
    cfg: &LbConfig,
) -> Vec<(u64, usize)> {
    let total: f64 = members
        .iter()
        .map(|i| metas.get(*i).map_or(1.0, |m| f64::from(m.weight.max(1))))
        .sum();
    if members.is_empty() || total == 0.0 {
        return Vec::new();
    }
    let norm = |i: usize| metas.get(i).map_or(1.0, |m| f64::from(m.weight.max(1))) / total;
    let min_norm = members.iter().map(|i| norm(*i)).fold(f64::MAX, f64::min);
    let scale =
        ((min_norm * cfg.min_ring_size as f64).ceil() / min_norm).min(cfg.max_ring_size as f64);
    let mut ring = Vec::with_capacity(scale.ceil() as usize);
    let (mut current, mut target) = (0.0f64, 0.0f64);
    for &i in members {
        let Some(h) = hosts.get(i) else { continue };
        let id = h.id();
        target += scale * norm(i);
        let mut n = 0u64;
        while current < target {
            ring.push((hash_bytes(format!("{id}_{n}").as_bytes()), i));
            n += 1;
            current += 1.0;
        }
    }
    ring.sort_by_key(|(h, _)| *h);
    ring
}

fn ring_lookup(ring: &[(u64, usize)], hash: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
    let n = ring.len();
    let start = ring.partition_point(|(h, _)| *h < hash);
    // Walking on from an unavailable host is the ring without that host.
    (0..n)
        .filter_map(|k| ring.get((start + k) % n).map(|e| e.1))
        .find(|i| ok(*i))
}

/// Weighted maglev (Eisenbud et al.) as Envoy builds it: the hosts sorted
/// by address, each with its XXH64 offset (seed 0) and skip (seed 1), take
/// slots along their permutations round after round, a host of weight `w`
/// every `max / w` rounds; so a key lands on the same host as in Envoy.
fn build_maglev<H: LbHost>(
    hosts: &[H],
    metas: &[HostMeta],
    members: &[usize],
    table_size: u64,
) -> Vec<usize> {
    let m = table_size.max(2);
    struct Entry {
        key: String,
        host: usize,
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    let total: f64 = members
        .iter()
        .map(|i| metas.get(*i).map_or(1.0, |x| f64::from(x.weight.max(1))))
        .sum();
    let mut entries: Vec<Entry> = members
        .iter()
        .filter_map(|i| {
            let key = hosts.get(*i)?.id();
            let w = metas.get(*i).map_or(1.0, |x| f64::from(x.weight.max(1)));
            Some(Entry {
                offset: hash_seeded(key.as_bytes(), 0) % m,
                skip: hash_seeded(key.as_bytes(), 1) % (m - 1) + 1,
                key,
                host: *i,
                weight: w / total,
                target: 0.0,
                next: 0,
            })
        })
        .collect();
    if entries.is_empty() {
        return Vec::new();
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
    let size = usize::try_from(m).unwrap_or(65537);
    let mut table = vec![usize::MAX; size];
    let mut filled = 0usize;
    let mut round = 1u32;
    while filled < size {
        for e in entries.iter_mut() {
            if filled == size {
                break;
            }
            if f64::from(round) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let mut c = usize::try_from((e.offset + e.skip * e.next) % m).unwrap_or(0);
            while table.get(c).is_some_and(|slot| *slot != usize::MAX) {
                e.next += 1;
                c = usize::try_from((e.offset + e.skip * e.next) % m).unwrap_or(0);
            }
            if let Some(slot) = table.get_mut(c) {
                *slot = e.host;
            }
            e.next += 1;
            filled += 1;
        }
        round += 1;
    }
    table
}

fn maglev_lookup(table: &[usize], hash: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
    let n = table.len() as u64;
    if n == 0 {
        return None;
    }
    // An unavailable host's keys move to other hosts by re-hashing; the keys
    // of every other host stay where they are.
    let mut h = hash;
    for _ in 0..16 {
        let i = *table.get(usize::try_from(h % n).ok()?)?;
        if ok(i) {
            return Some(i);
        }
        h = mix(h.wrapping_add(0x9e37_79b9_7f4a_7c15));
    }
    table.iter().copied().find(|i| ok(*i))
}

/// XXH64 with seed 0, Envoy's `HashUtil::xxHash64`: request hashes and ring
/// points agree with Envoy's, so in a mixed mesh a key reaches the same host
/// through either proxy.
pub fn hash_bytes(b: &[u8]) -> u64 {
    hash_seeded(b, 0)
}

fn hash_seeded(b: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(b, seed)
}

fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A request's hash and, for a cookie policy with a TTL whose cookie was
/// missing, the `set-cookie` to send back with the response.
#[derive(Debug, Default, Clone)]
pub struct RequestHash {
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

impl RequestHash {
    /// Adds the generated cookie, if any, to the response headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(c) = &self.set_cookie {
            headers.append(http::header::SET_COOKIE, c.clone());
        }
    }
}

/// Computes the hash of a request from the route's hash policies as Envoy
/// does: each policy that yields a value is folded in (rotate left by one,
/// xor), and a `terminal` policy that yielded one ends the walk.
pub fn request_hash(
    policies: &[HashPolicy],
    headers: &HeaderMap,
    uri: &Uri,
    peer: SocketAddr,
    local: SocketAddr,
    filter_state: Option<&ferry_model::filter_state::FilterState>,
) -> RequestHash {
    let mut out = RequestHash::default();
    for p in policies {
        let h = match &p.kind {
            HashPolicyKind::Header(name) => {
                let values: Vec<&[u8]> = headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                (!values.is_empty()).then(|| hash_bytes(&values.concat()))
            }
            HashPolicyKind::SourceIp => Some(hash_bytes(ip_text(peer.ip()).as_bytes())),
            HashPolicyKind::FilterState(key) => filter_state
                .and_then(|s| s.get(key))
                .and_then(|o| o.hash_input())
                .map(|v| hash_bytes(v.as_bytes())),
            HashPolicyKind::QueryParameter(name) => uri
                .query()
                .and_then(|q| {
                    q.split('&').find_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then(|| v.to_string())
                    })
                })
                .map(|v| hash_bytes(v.as_bytes())),
            HashPolicyKind::Cookie { name, ttl, path } => match cookie(headers, name) {
                Some(v) => Some(hash_bytes(v.as_bytes())),
                None => ttl.map(|ttl| {
                    // Envoy derives the new cookie from the connection's two
                    // addresses, so racing requests of one connection agree.
                    let value = format!("{:016x}", hash_bytes(format!("{peer}{local}").as_bytes()));
                    let mut c = format!("{name}=\"{value}\"");
                    if !ttl.is_zero() {
                        c.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                    }
                    if let Some(p) = path {
                        c.push_str(&format!("; Path={p}"));
                    }
                    c.push_str("; HttpOnly");
                    out.set_cookie = HeaderValue::from_str(&c).ok();
                    hash_bytes(value.as_bytes())
                }),
            },
        };
        if let Some(h) = h {
            out.hash = Some(match out.hash {
                Some(prev) => prev.rotate_left(1) ^ h,
                None => h,
            });
            if p.terminal {
                break;
            }
        }
    }
    out
}

pub fn ip_text(ip: IpAddr) -> String {
    ip.to_string()
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    #[derive(Clone)]
    struct TestHost {
        id: String,
        up: Arc<AtomicBool>,
        active: Arc<AtomicU64>,
        cost: f64,
        age: Option<std::time::Duration>,
        excluded: bool,
    }

    impl LbHost for TestHost {
        fn id(&self) -> String {
            self.id.clone()
        }
        fn available(&self) -> bool {
            self.up.load(Ordering::Relaxed)
        }
        fn excluded(&self) -> bool {
            self.excluded
        }
        fn active(&self) -> u64 {
            self.active.load(Ordering::Relaxed)
        }
        fn latency_cost(&self) -> f64 {
            self.cost
        }
        fn age(&self) -> Option<std::time::Duration> {
            self.age
        }
    }

    fn host(n: usize) -> TestHost {
        TestHost {
            id: format!("10.0.0.{n}:80"),
            up: Arc::new(AtomicBool::new(true)),
            active: Arc::new(AtomicU64::new(0)),
            cost: 0.0,
            age: None,
            excluded: false,
        }
    }

    #[test]
    fn slow_start_ramps_a_new_host_up() {
        use ferry_model::cluster::SlowStart;
        let window = std::time::Duration::from_secs(10);
        let ramp = SlowStart {
            window,
            aggression: 1.0,
            min_weight: 0.1,
        };
        // Envoy's factor: max(min_weight, (age / window)^(1 / aggression)).
        assert_eq!(ramp.factor(window), 1.0);
        assert!((ramp.factor(window / 4) - 0.25).abs() < 1e-9);
        assert!((ramp.factor(std::time::Duration::ZERO) - 0.1).abs() < 1e-9);
        let steep = SlowStart {
            aggression: 2.0,
            ..ramp
        };
        assert!((steep.factor(window / 4) - 0.5).abs() < 1e-9);
        for policy in [LbPolicy::RoundRobin, LbPolicy::LeastRequest] {
            let old = host(1);
            let mut young = host(2);
            // A quarter into its window: a quarter of its weight.
            young.age = Some(window / 4);
            let hs = vec![(old, meta(1, 0)), (young, meta(1, 0))];
            let cfg = LbConfig {
                slow_start: Some(ramp),
                ..LbConfig::default()
            };
            let b = Balancer::new(policy, &cfg, hs.clone());
            let n = 20_000;
            let c = counts(&b, n, |_| None);
            let share = c.get("10.0.0.2:80").copied().unwrap_or(0) as f64 / n as f64;
            if policy == LbPolicy::RoundRobin {
                // 0.25 / 1.25 of the picks, within a generous bound.
                assert!((share - 0.2).abs() < 0.03, "{policy:?}: {share}");
            } else {
                // Least request with no load: hosts are sampled by their
                // scaled weights, so the same 0.25 / 1.25.
                assert!((share - 0.2).abs() < 0.03, "{policy:?}: {share}");
            }
            // Without slow start the two share evenly.
            let plain = Balancer::new(policy, &LbConfig::default(), hs);
            let c = counts(&plain, n, |_| None);
            let share = c.get("10.0.0.2:80").copied().unwrap_or(0) as f64 / n as f64;
            assert!((share - 0.5).abs() < 0.05, "{policy:?} plain: {share}");
        }
    }

    #[test]
    fn healthy_panic_threshold_is_configurable() {
        let hs: Vec<_> = (1..=4).map(|n| (host(n), meta(1, 0))).collect();
        // One of four available: 25 % × 1.4 = 35 %, below the default 50 %.
        for h in &hs[1..] {
            h.0.up.store(false, Ordering::Relaxed);
        }
        let panicking = balancer(LbPolicy::RoundRobin, &hs);
        let c = counts(&panicking, 400, |_| None);
        assert_eq!(c.len(), 4, "panic mode uses every host: {c:?}");
        let cfg = LbConfig {
            healthy_panic_threshold: 30.0,
            ..LbConfig::default()
        };
        let calm = Balancer::new(LbPolicy::RoundRobin, &cfg, hs.clone());
        let c = counts(&calm, 400, |_| None);
        assert_eq!(
            c.len(),
            1,
            "above a 30 % threshold: the healthy host only: {c:?}"
        );
        // 0 disables panic mode: with no host available nothing is picked.
        hs[0].0.up.store(false, Ordering::Relaxed);
        let off = LbConfig {
            healthy_panic_threshold: 0.0,
            ..LbConfig::default()
        };
        let none = Balancer::new(LbPolicy::RoundRobin, &off, hs.clone());
        assert!(none.pick(None).is_none());
        let default = balancer(LbPolicy::RoundRobin, &hs);
        assert!(default.pick(None).is_some(), "the default panics instead");
    }

    fn meta(weight: u32, priority: u32) -> HostMeta {
        HostMeta {
            weight,
            priority,
            ..HostMeta::default()
        }
    }

    fn balancer(policy: LbPolicy, hosts: &[(TestHost, HostMeta)]) -> Balancer<TestHost> {
        Balancer::new(policy, &LbConfig::default(), hosts.to_vec())
    }

    fn counts(
        b: &Balancer<TestHost>,
        n: usize,
        hash: impl Fn(usize) -> Option<u64>,
    ) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for k in 0..n {
            if let Some(h) = b.pick(hash(k)) {
                *m.entry(h.id.clone()).or_default() += 1;
            }
        }
        m
    }

    #[test]
    fn round_robin_is_exact_and_weighted() {
        let hs: Vec<_> = (1..=3).map(|n| (host(n), meta(n as u32, 0))).collect();
        let b = balancer(LbPolicy::RoundRobin, &hs);
        let c = counts(&b, 600, |_| None);
        assert_eq!(c["10.0.0.1:80"], 100);
        assert_eq!(c["10.0.0.2:80"], 200);
        assert_eq!(c["10.0.0.3:80"], 300);
        // Smooth: the heaviest host never gets three in a row in one period.
        let seq: Vec<String> = (0..6)
            .filter_map(|_| b.pick(None).map(|h| h.id.clone()))
            .collect();
        assert!(
            seq.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
            "{seq:?}"
        );
    }

    #[test]
    fn equal_weights_keep_no_second_sequence_and_still_take_turns() {
        let hs: Vec<_> = (1..=4).map(|n| (host(n), meta(3, 0))).collect();
        let b = balancer(LbPolicy::RoundRobin, &hs);
        let g = &b.levels[0].groups[0];
        assert!(g.sequence.is_empty(), "the members are the sequence");
        assert_eq!(g.sequence(), &g.members[..]);
        let c = counts(&b, 400, |_| None);
        assert!(c.values().all(|n| *n == 100), "{c:?}");
        let seq: Vec<String> = (0..4)
            .filter_map(|_| b.pick(None).map(|h| h.id.clone()))
            .collect();
        let mut distinct = seq.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "one turn each: {seq:?}");
    }

    #[test]
    fn every_policy_skips_unavailable_hosts() {
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
            LbPolicy::Random,
            LbPolicy::RingHash,
            LbPolicy::Maglev,
        ] {
            let hs: Vec<_> = (1..=4).map(|n| (host(n), meta(1, 0))).collect();
            hs[1].0.up.store(false, Ordering::Relaxed);
            let b = balancer(policy, &hs);
            let c = counts(&b, 2000, |k| Some(hash_bytes(&k.to_le_bytes())));
            assert!(!c.contains_key("10.0.0.2:80"), "{policy:?}: {c:?}");
            assert_eq!(c.values().sum::<usize>(), 2000);
            assert_eq!(c.len(), 3, "{policy:?}: {c:?}");
        }
    }

    #[test]
    fn a_retry_keeps_the_hash_and_passes_over_tried_hosts() {
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
            LbPolicy::Random,
            LbPolicy::RingHash,
            LbPolicy::Maglev,
        ] {
            let hs: Vec<_> = (1..=3).map(|n| (host(n), meta(1, 0))).collect();
            let b = balancer(policy, &hs);
            for k in 0..50u64 {
                let hash = Some(hash_bytes(&k.to_le_bytes()));
                let first = b.pick(hash).unwrap().id.clone();
                let second = b.pick_except(hash, &|h| h.id == first).unwrap().id.clone();
                assert_ne!(first, second, "{policy:?}: the tried host again");
                let third = b
                    .pick_except(hash, &|h| h.id == first || h.id == second)
                    .unwrap()
                    .id
                    .clone();
                assert!(third != first && third != second, "{policy:?}");
                // Every host tried: the plain choice stands.
                assert!(b.pick_except(hash, &|_| true).is_some(), "{policy:?}");
                if matches!(policy, LbPolicy::RingHash | LbPolicy::Maglev) {
                    // Hashed choices are deterministic: the same key retried
                    // with the same history lands on the same next host.
                    let again = b.pick_except(hash, &|h| h.id == first).unwrap();
                    assert_eq!(again.id, second, "{policy:?}");
                    assert_eq!(b.pick(hash).unwrap().id, first, "{policy:?}");
                }
            }
        }
    }

    #[test]
    fn peak_ewma_prefers_the_fast_host() {
        let slow = TestHost {
            cost: 10_000_000.0,
            ..host(1)
        };
        let fast = TestHost {
            cost: 1_000_000.0,
            ..host(2)
        };
        let cfg = LbConfig {
            peak_ewma: true,
            ..LbConfig::default()
        };
        let b = Balancer::new(
            LbPolicy::LeastRequest,
            &cfg,
            vec![(slow, meta(1, 0)), (fast, meta(1, 0))],
        );
        let c = counts(&b, 10_000, |_| None);
        // The slow host wins only when both samples are the slow host: 1/4.
        let slow = c.get("10.0.0.1:80").copied().unwrap_or(0);
        assert!((2_200..=2_800).contains(&slow), "{c:?}");
    }

    #[test]
    fn random_is_uniform_within_bounds() {
        let hs: Vec<_> = (1..=4).map(|n| (host(n), meta(1, 0))).collect();
        let b = balancer(LbPolicy::Random, &hs);
        let c = counts(&b, 40_000, |_| None);
        // Expected 10 000 each, σ ≈ 87: ±600 is about 7σ.
        for v in c.values() {
            assert!((9_400..=10_600).contains(v), "{c:?}");
        }
    }

    #[test]
    fn least_request_prefers_idle_hosts_and_honours_weights() {
        let hs: Vec<_> = (1..=3).map(|n| (host(n), meta(1, 0))).collect();
        hs[0].0.active.store(10, Ordering::Relaxed);
        let b = balancer(LbPolicy::LeastRequest, &hs);
        let c = counts(&b, 9_000, |_| None);
        // Host 1 wins only when both samples are host 1: p = 1/9.
        let busy = c.get("10.0.0.1:80").copied().unwrap_or(0);
        assert!((700..=1_300).contains(&busy), "{c:?}");
        // Weighted and all idle: picks follow the weights (1:3), as Envoy's
        // weight / (active + 1) scheduling does.
        let hs: Vec<_> = vec![(host(1), meta(1, 0)), (host(2), meta(3, 0))];
        let b = balancer(LbPolicy::LeastRequest, &hs);
        let c = counts(&b, 40_000, |_| None);
        let heavy = c["10.0.0.2:80"] as f64 / 40_000.0;
        assert!((0.72..0.78).contains(&heavy), "{c:?}");
    }

    #[test]
    fn consistent_hashes_stick_and_remap_minimally() {
        for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
            let hs: Vec<_> = (1..=5).map(|n| (host(n), meta(1, 0))).collect();
            let b = balancer(policy, &hs);
            let keys: Vec<u64> = (0..5_000u32)
                .map(|k| hash_bytes(&k.to_le_bytes()))
                .collect();
            let before: Vec<String> = keys
                .iter()
                .filter_map(|k| b.pick(Some(*k)).map(|h| h.id.clone()))
                .collect();
            // Sticky: the same key, the same host.
            for (k, h) in keys.iter().zip(&before).take(100) {
                assert_eq!(b.pick(Some(*k)).map(|x| x.id.clone()).as_ref(), Some(h));
            }
            // Spread: each host owns roughly a fifth of the keys.
            let mut c: HashMap<&String, usize> = HashMap::new();
            for h in &before {
                *c.entry(h).or_default() += 1;
            }
            for v in c.values() {
                assert!((600..=1_400).contains(v), "{policy:?} {c:?}");
            }
            // One host leaves: only its keys move.
            hs[2].0.up.store(false, Ordering::Relaxed);
            let mut moved = 0;
            for (k, old) in keys.iter().zip(&before) {
                let now = b.pick(Some(*k)).map(|h| h.id.clone()).unwrap_or_default();
                if &now != old {
                    assert_eq!(
                        old, "10.0.0.3:80",
                        "{policy:?}: a key of another host moved"
                    );
                    moved += 1;
                }
            }
            assert_eq!(moved, c[&"10.0.0.3:80".to_string()]);
        }
    }

    #[test]
    fn ring_size_follows_min_and_max() {
        let hs: Vec<_> = (1..=3).map(|n| (host(n), meta(1, 0))).collect();
        let b = balancer(LbPolicy::RingHash, &hs);
        assert!(b.levels[0].ring.len() >= 1024);
        let cfg = LbConfig {
            min_ring_size: 16,
            max_ring_size: 64,
            ..LbConfig::default()
        };
        let hs: Vec<_> = vec![(host(1), meta(1, 0)), (host(2), meta(1000, 0))];
        let b = Balancer::new(LbPolicy::RingHash, &cfg, hs);
        assert!(b.levels[0].ring.len() <= 66, "{}", b.levels[0].ring.len());
    }

    #[test]
    fn maglev_table_is_full_and_weighted() {
        let hs: Vec<_> = vec![(host(1), meta(1, 0)), (host(2), meta(3, 0))];
        let b = balancer(LbPolicy::Maglev, &hs);
        let t = &b.levels[0].maglev;
        assert_eq!(t.len(), 65537);
        let heavy = t.iter().filter(|i| **i == 1).count() as f64 / t.len() as f64;
        assert!((0.72..0.78).contains(&heavy), "{heavy}");
    }

    #[test]
    fn priorities_fail_over_with_overprovisioning() {
        // P0: 4 hosts, P1: 2 hosts.
        let mut hs: Vec<_> = (1..=4).map(|n| (host(n), meta(1, 0))).collect();
        hs.extend((5..=6).map(|n| (host(n), meta(1, 1))));
        let b = balancer(LbPolicy::RoundRobin, &hs);
        let c = counts(&b, 1000, |_| None);
        assert!(
            c.keys().all(|k| k.as_str() < "10.0.0.5"),
            "all on P0: {c:?}"
        );
        // Half of P0 gone: P0 takes 0.5 × 1.4 = 70 %, P1 the other 30 %.
        hs[0].0.up.store(false, Ordering::Relaxed);
        hs[1].0.up.store(false, Ordering::Relaxed);
        let c = counts(&b, 10_000, |_| None);
        let p1 = c.get("10.0.0.5:80").unwrap_or(&0) + c.get("10.0.0.6:80").unwrap_or(&0);
        assert!((2_700..=3_300).contains(&p1), "{c:?}");
        // All of P0 gone: everything on P1.
        hs[2].0.up.store(false, Ordering::Relaxed);
        hs[3].0.up.store(false, Ordering::Relaxed);
        let c = counts(&b, 1000, |_| None);
        assert_eq!(c.values().sum::<usize>(), 1000);
        assert!(c.keys().all(|k| k.as_str() >= "10.0.0.5"), "{c:?}");
    }

    #[test]
    fn degraded_hosts_serve_only_when_no_healthy_host_is_left() {
        let degraded = HostMeta {
            degraded: true,
            ..HostMeta::default()
        };
        let mut hs: Vec<_> = (1..=3).map(|n| (host(n), meta(1, 0))).collect();
        hs.extend((4..=6).map(|n| (host(n), degraded)));
        let b = balancer(LbPolicy::RoundRobin, &hs);
        let c = counts(&b, 300, |_| None);
        assert_eq!(c.len(), 3, "only the healthy hosts: {c:?}");
        assert!(c.keys().all(|k| k.as_str() < "10.0.0.4"), "{c:?}");
        for h in hs.iter().take(3) {
            h.0.up.store(false, Ordering::Relaxed);
        }
        let c = counts(&b, 300, |_| None);
        assert_eq!(c.len(), 3, "only the degraded hosts: {c:?}");
        assert!(c.keys().all(|k| k.as_str() >= "10.0.0.4"), "{c:?}");
    }

    /// Excluded hosts (failed at once by `x-envoy-immediate-health-check-fail`)
    /// leave the denominator: of four hosts, two excluded, one healthy and one
    /// failed, the level is 1 / (4 - 2) available, above the panic threshold,
    /// so only the healthy host takes traffic (counting the excluded hosts,
    /// 1 / 4 would be panic and the failed host would get half of it).
    #[test]
    fn excluded_hosts_do_not_count_towards_panic() {
        let hs: Vec<_> = (1..=4)
            .map(|n| {
                let mut h = host(n);
                h.excluded = n >= 3;
                if n >= 2 {
                    h.up.store(false, Ordering::Relaxed);
                }
                (h, meta(1, 0))
            })
            .collect();
        let b = balancer(LbPolicy::RoundRobin, &hs);
        let c = counts(&b, 200, |_| None);
        assert_eq!(c.keys().collect::<Vec<_>>(), vec!["10.0.0.1:80"], "{c:?}");
        // With every host but the failed one excluded the level is 0 / 1:
        // panic, and the failed host (not excluded) takes the traffic.
        let hs: Vec<_> = (1..=3)
            .map(|n| {
                let mut h = host(n);
                h.excluded = n >= 2;
                h.up.store(n >= 2, Ordering::Relaxed);
                (h, meta(1, 0))
            })
            .collect();
        let b = balancer(LbPolicy::RoundRobin, &hs);
        let c = counts(&b, 200, |_| None);
        assert_eq!(c.keys().collect::<Vec<_>>(), vec!["10.0.0.1:80"], "{c:?}");
    }

    #[test]
    fn panic_mode_uses_every_host() {
        let hs: Vec<_> = (1..=4).map(|n| (host(n), meta(1, 0))).collect();
        for h in hs.iter().take(3) {
            h.0.up.store(false, Ordering::Relaxed);
        }
        let b = balancer(LbPolicy::RoundRobin, &hs);
        let c = counts(&b, 400, |_| None);
        assert_eq!(c.len(), 4, "{c:?}");
    }

    #[test]
    fn locality_weights_split_traffic() {
        let hs: Vec<_> = vec![
            (
                host(1),
                HostMeta {
                    locality: 0,
                    locality_weight: 1,
                    ..HostMeta::default()
                },
            ),
            (
                host(2),
                HostMeta {
                    locality: 1,
                    locality_weight: 3,
                    ..HostMeta::default()
                },
            ),
        ];
        let cfg = LbConfig {
            locality_weighted: true,
            ..LbConfig::default()
        };
        let b = Balancer::new(LbPolicy::RoundRobin, &cfg, hs);
        let c = counts(&b, 20_000, |_| None);
        let heavy = c["10.0.0.2:80"];
        assert!((14_400..=15_600).contains(&heavy), "{c:?}");
    }

    #[test]
    fn hash_policy_on_filter_state_hashes_hashable_objects_only() {
        use ferry_model::filter_state::{FilterState, Object, Shared};
        let peer: SocketAddr = "10.1.1.1:5555".parse().unwrap();
        let uri: Uri = "/".parse().unwrap();
        let mut fs = FilterState::default();
        let string = |value: &str, hashable| Object::String {
            value: value.into(),
            hashable,
        };
        fs.set("h", string("alice", true), false, Shared::None);
        fs.set("plain", string("bob", false), false, Shared::None);
        fs.set("a", Object::Address(peer), false, Shared::None);
        let by = |key: &str| {
            let ps = [HashPolicy {
                kind: HashPolicyKind::FilterState(key.into()),
                terminal: false,
            }];
            request_hash(&ps, &HeaderMap::new(), &uri, peer, peer, Some(&fs)).hash
        };
        assert_eq!(by("h"), Some(hash_bytes(b"alice")));
        assert_eq!(by("a"), Some(hash_bytes(b"10.1.1.1:5555")));
        // A plain string is not hashable, and an absent key hashes nothing.
        assert_eq!(by("plain"), None);
        assert_eq!(by("missing"), None);
    }

    #[test]
    fn hash_policies_header_cookie_source_ip_query() {
        let peer: SocketAddr = "10.1.1.1:5555".parse().unwrap();
        let local: SocketAddr = "10.2.2.2:80".parse().unwrap();
        let uri: Uri = "/p?user=alice&x=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("bob"));
        let pol = |kind| HashPolicy {
            kind,
            terminal: false,
        };
        let h = |ps: &[HashPolicy], hd: &HeaderMap| request_hash(ps, hd, &uri, peer, local, None);

        let by_header = [pol(HashPolicyKind::Header("x-user".into()))];
        assert_eq!(h(&by_header, &headers).hash, Some(hash_bytes(b"bob")));
        assert_eq!(h(&by_header, &HeaderMap::new()).hash, None);

        let by_query = [pol(HashPolicyKind::QueryParameter("user".into()))];
        assert_eq!(h(&by_query, &headers).hash, Some(hash_bytes(b"alice")));

        let by_ip = [pol(HashPolicyKind::SourceIp)];
        assert_eq!(h(&by_ip, &headers).hash, Some(hash_bytes(b"10.1.1.1")));

        // Terminal: a later policy is not folded in once one matched.
        let terminal = [
            HashPolicy {
                kind: HashPolicyKind::Header("x-user".into()),
                terminal: true,
            },
            pol(HashPolicyKind::SourceIp),
        ];
        assert_eq!(h(&terminal, &headers).hash, Some(hash_bytes(b"bob")));
        let both = [
            pol(HashPolicyKind::Header("x-user".into())),
            pol(HashPolicyKind::SourceIp),
        ];
        assert_eq!(
            h(&both, &headers).hash,
            Some(hash_bytes(b"bob").rotate_left(1) ^ hash_bytes(b"10.1.1.1"))
        );

        // Cookie: present → its value; absent with a TTL → generated and set.
        let by_cookie = [pol(HashPolicyKind::Cookie {
            name: "sticky".into(),
            ttl: Some(std::time::Duration::from_secs(60)),
            path: Some("/".into()),
        })];
        let generated = h(&by_cookie, &headers);
        let set = generated.set_cookie.clone().unwrap();
        let set = set.to_str().unwrap();
        assert!(set.starts_with("sticky=\""), "{set}");
        assert!(set.ends_with("; Max-Age=60; Path=/; HttpOnly"), "{set}");
        let value = set.split('"').nth(1).unwrap();
        let mut with = headers.clone();
        with.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("a=b; sticky=\"{value}\"")).unwrap(),
        );
        let again = h(&by_cookie, &with);
        assert_eq!(
            again.hash, generated.hash,
            "the client sends the cookie back: same hash"
        );
        assert!(again.set_cookie.is_none());
        let no_ttl = [pol(HashPolicyKind::Cookie {
            name: "s".into(),
            ttl: None,
            path: None,
        })];
        assert_eq!(h(&no_ttl, &headers).hash, None);
    }
}
