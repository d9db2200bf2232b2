//! Validated metric types. Requests are turned into these at the boundary
//! (`TryFrom<proto>`), so the service and repository never see raw input.

use std::cmp::Ordering;

use trainmesh_common::error::FieldError;
use trainmesh_common::proto::metrics::v1 as pb;
use trainmesh_common::time;

use crate::flatten;

trainmesh_common::typed_id!(
    /// The job a metric belongs to (job-service's id; not checked here).
    JobId
);

/// Longest metric key, in bytes.
pub const MAX_KEY_BYTES: usize = 250;
/// Most points in one batch, counting those flattened out of `json_records`.
pub const MAX_POINTS_PER_BATCH: usize = 1000;
/// Most bytes of `json_records` in one batch.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;
/// Points per series when a query does not say.
pub const DEFAULT_MAX_POINTS: usize = 1000;
/// Most points per series a query may ask for.
pub const MAX_QUERY_POINTS: usize = 10_000;
/// Most keys a read request may name.
pub const MAX_REQUEST_KEYS: usize = 1000;

/// A non-empty metric name of at most [`MAX_KEY_BYTES`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricKey(String);

impl MetricKey {
    /// The error names `field` and, for a long key, the key itself.
    pub fn parse(field: &str, key: &str) -> Result<Self, FieldError> {
        if key.is_empty() {
            return Err(FieldError::new(field, "metric key must not be empty"));
        }
        if key.len() > MAX_KEY_BYTES {
            let shown: String = key.chars().take(40).collect();
            return Err(FieldError::new(
                field,
                format!(
                    "metric key `{shown}…` is {} bytes; at most {MAX_KEY_BYTES} are allowed",
                    key.len()
                ),
            ));
        }
        Ok(Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// A key read back from the database, where only valid keys are written.
    pub(crate) fn stored(key: String) -> Self {
        Self(key)
    }
}

/// How a value is stored: SQLite cannot keep NaN, so the kind is stored next
/// to the number and the value rebuilt from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Finite,
    Nan,
    PosInf,
    NegInf,
}

impl ValueKind {
    pub fn of(v: f64) -> Self {
        if v.is_nan() {
            ValueKind::Nan
        } else if v == f64::INFINITY {
            ValueKind::PosInf
        } else if v == f64::NEG_INFINITY {
            ValueKind::NegInf
        } else {
            ValueKind::Finite
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ValueKind::Finite => "finite",
            ValueKind::Nan => "nan",
            ValueKind::PosInf => "+inf",
            ValueKind::NegInf => "-inf",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "finite" => Some(ValueKind::Finite),
            "nan" => Some(ValueKind::Nan),
            "+inf" => Some(ValueKind::PosInf),
            "-inf" => Some(ValueKind::NegInf),
            _ => None,
        }
    }

    /// Position in the total order of values: -inf < finite < +inf < NaN.
    pub fn rank(self) -> i64 {
        match self {
            ValueKind::NegInf => 0,
            ValueKind::Finite => 1,
            ValueKind::PosInf => 2,
            ValueKind::Nan => 3,
        }
    }

    /// The value from its stored form (`stored` is NULL unless finite).
    pub fn rebuild(self, stored: Option<f64>) -> f64 {
        match self {
            ValueKind::Finite => stored.unwrap_or(0.0),
            ValueKind::Nan => f64::NAN,
            ValueKind::PosInf => f64::INFINITY,
            ValueKind::NegInf => f64::NEG_INFINITY,
        }
    }
}

/// Total order of values in which every NaN is equal and greatest.
pub fn cmp_values(a: f64, b: f64) -> Ordering {
    let (ka, kb) = (ValueKind::of(a), ValueKind::of(b));
    ka.rank().cmp(&kb.rank()).then_with(|| {
        if ka == ValueKind::Finite {
            a.total_cmp(&b)
        } else {
            Ordering::Equal
        }
    })
}

/// One sample of one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub key: MetricKey,
    pub step: i64,
    pub ts_micros: i64,
    pub value: f64,
}

impl Point {
    pub fn kind(&self) -> ValueKind {
        ValueKind::of(self.value)
    }

    /// The value as stored in a REAL column: NULL unless finite.
    pub fn stored_value(&self) -> Option<f64> {
        self.value.is_finite().then_some(self.value)
    }

    /// Ordering of "latest": greatest (step, timestamp, value) wins.
    pub fn cmp_latest(&self, other: &Point) -> Ordering {
        self.step
            .cmp(&other.step)
            .then(self.ts_micros.cmp(&other.ts_micros))
            .then_with(|| cmp_values(self.value, other.value))
    }

    pub fn to_proto(&self) -> pb::MetricPoint {
        pb::MetricPoint {
            key: self.key.as_str().to_owned(),
            step: self.step,
            value: self.value,
            time: Some(time::to_timestamp(self.ts_micros)),
            non_finite: !self.value.is_finite(),
        }
    }
}

/// A validated WriteMetrics batch: explicit points, then the points of each
/// JSON record in order.
#[derive(Clone, Debug)]
pub struct WriteBatch {
    pub job_id: JobId,
    /// The attempt that produced the points; 0 when not said.
    pub attempt: i32,
    pub points: Vec<Point>,
}

impl TryFrom<pb::WriteMetricsRequest> for WriteBatch {
    type Error = FieldError;

    fn try_from(req: pb::WriteMetricsRequest) -> Result<Self, Self::Error> {
        let job_id = JobId::parse_field("job_id", &req.job_id)?;
        if req.attempt < 0 {
            return Err(FieldError::new("attempt", "must not be negative"));
        }
        if req.points.len() > MAX_POINTS_PER_BATCH {
            return Err(too_many("points", req.points.len()));
        }
        let json_bytes: usize = req.json_records.iter().map(String::len).sum();
        if json_bytes > MAX_JSON_BYTES {
            return Err(FieldError::new(
                "json_records",
                format!("batch holds {json_bytes} bytes of records; at most {MAX_JSON_BYTES} are allowed"),
            ));
        }
        let now = time::now_micros();
        let mut points = Vec::with_capacity(req.points.len());
        for (i, p) in req.points.into_iter().enumerate() {
            let key = MetricKey::parse(&format!("points[{i}].key"), &p.key)?;
            if p.step < 0 {
                return Err(FieldError::new(
                    format!("points[{i}].step"),
                    "must not be negative",
                ));
            }
            points.push(Point {
                key,
                step: p.step,
                ts_micros: p.time.as_ref().map_or(now, time::from_timestamp),
                value: p.value,
            });
        }
        for (i, record) in req.json_records.iter().enumerate() {
            let field = format!("json_records[{i}]");
            flatten::parse_record(record, now, &mut points)
                .map_err(|e| FieldError::new(&field, e))?;
            if points.len() > MAX_POINTS_PER_BATCH {
                return Err(FieldError::new(
                    field,
                    format!(
                        "the batch reaches more than {MAX_POINTS_PER_BATCH} points here \
                         (counting every flattened key); split it"
                    ),
                ));
            }
        }
        Ok(Self {
            job_id,
            attempt: req.attempt,
            points,
        })
    }
}

fn too_many(field: &str, n: usize) -> FieldError {
    FieldError::new(
        field,
        format!("batch has {n} points; at most {MAX_POINTS_PER_BATCH} are allowed"),
    )
}

/// Keys a read asks for; empty means every key. Keys that are not valid
/// metric keys are refused so a typo is not silently an empty answer.
fn parse_keys(keys: Vec<String>) -> Result<Vec<MetricKey>, FieldError> {
    if keys.len() > MAX_REQUEST_KEYS {
        return Err(FieldError::new(
            "keys",
            format!("at most {MAX_REQUEST_KEYS} keys per request"),
        ));
    }
    keys.iter()
        .enumerate()
        .map(|(i, k)| MetricKey::parse(&format!("keys[{i}]"), k))
        .collect()
}

/// Most latest values in one GetLatestMetrics answer, and the default: at
/// the longest keys about 280 KB, and every key of a job under the default
/// key cap, so clients that do not page see no change.
pub const MAX_LATEST_PAGE: usize = 1000;

/// Which latest values one GetLatestMetrics answer covers.
#[derive(Clone, Debug, Default)]
pub struct LatestPage {
    /// Only these keys (empty: any).
    pub keys: Vec<MetricKey>,
    /// Only keys starting with this.
    pub prefix: Option<MetricKey>,
    /// Only keys after this one (the last key of the previous page).
    pub after: Option<MetricKey>,
}

#[derive(Clone, Debug)]
pub struct LatestQuery {
    pub job_id: JobId,
    pub page: LatestPage,
    pub page_size: usize,
}

/// The page token that continues after `key`.
pub fn latest_page_token(key: &MetricKey) -> String {
    hex::encode(key.as_str())
}

fn parse_page_token(token: &str) -> Result<Option<MetricKey>, FieldError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || FieldError::new("page_token", "is not a next_page_token of GetLatestMetrics");
    let bytes = hex::decode(token).map_err(|_| bad())?;
    let key = String::from_utf8(bytes).map_err(|_| bad())?;
    MetricKey::parse("page_token", &key)
        .map(Some)
        .map_err(|_| bad())
}

impl TryFrom<pb::GetLatestMetricsRequest> for LatestQuery {
    type Error = FieldError;
    fn try_from(req: pb::GetLatestMetricsRequest) -> Result<Self, Self::Error> {
        let page_size = match req.page_size {
            n if n < 0 => return Err(FieldError::new("page_size", "must not be negative")),
            0 => MAX_LATEST_PAGE,
            n => usize::try_from(n)
                .unwrap_or(MAX_LATEST_PAGE)
                .min(MAX_LATEST_PAGE),
        };
        let prefix = if req.key_prefix.is_empty() {
            None
        } else {
            Some(MetricKey::parse("key_prefix", &req.key_prefix)?)
        };
        Ok(Self {
            job_id: JobId::parse_field("job_id", &req.job_id)?,
            page: LatestPage {
                keys: parse_keys(req.keys)?,
                prefix,
                after: parse_page_token(&req.page_token)?,
            },
            page_size,
        })
    }
}

#[derive(Clone, Debug)]
pub struct RangeQuery {
    pub job_id: JobId,
    pub keys: Vec<MetricKey>,
    pub start_step: i64,
    /// Inclusive; `None` means no upper bound.
    pub end_step: Option<i64>,
    pub max_points: usize,
}

impl TryFrom<pb::QueryMetricsRequest> for RangeQuery {
    type Error = FieldError;
    fn try_from(req: pb::QueryMetricsRequest) -> Result<Self, Self::Error> {
        let job_id = JobId::parse_field("job_id", &req.job_id)?;
        if req.start_step < 0 {
            return Err(FieldError::new("start_step", "must not be negative"));
        }
        let end_step = match req.end_step {
            0 => None,
            e if e < 0 => return Err(FieldError::new("end_step", "must not be negative")),
            e if e < req.start_step => {
                return Err(FieldError::new(
                    "end_step",
                    format!("{e} is before start_step {}", req.start_step),
                ))
            }
            e => Some(e),
        };
        let max_points = match req.max_points {
            0 => DEFAULT_MAX_POINTS,
            n if n < 0 => return Err(FieldError::new("max_points", "must not be negative")),
            n if n as usize > MAX_QUERY_POINTS => {
                return Err(FieldError::new(
                    "max_points",
                    format!("{n} is more than the limit of {MAX_QUERY_POINTS}"),
                ))
            }
            n => n as usize,
        };
        Ok(Self {
            job_id,
            keys: parse_keys(req.keys)?,
            start_step: req.start_step,
            end_step,
            max_points,
        })
    }
}

/// Where a watch starts: after `after_seq`, or at the job's newest point.
#[derive(Clone, Debug)]
pub struct WatchQuery {
    pub job_id: JobId,
    pub keys: Vec<MetricKey>,
    /// `None`: from now.
    pub after_seq: Option<i64>,
}

impl TryFrom<pb::WatchMetricsRequest> for WatchQuery {
    type Error = FieldError;
    fn try_from(req: pb::WatchMetricsRequest) -> Result<Self, Self::Error> {
        let job_id = JobId::parse_field("job_id", &req.job_id)?;
        let after_seq = if req.cursor.is_empty() {
            None
        } else {
            match req.cursor.parse::<i64>() {
                Ok(n) if n >= 0 => Some(n),
                _ => {
                    return Err(FieldError::new(
                        "cursor",
                        format!("`{}` is not a cursor from a previous response", req.cursor),
                    ))
                }
            }
        };
        Ok(Self {
            job_id,
            keys: parse_keys(req.keys)?,
            after_seq,
        })
    }
}

/// Reduces a step-ordered series to at most `max` points: the series is cut
/// into equal buckets and each keeps its smallest and largest value (in step
/// order), so spikes and NaNs survive. Works on a stream: memory is O(`max`)
/// whatever the length of the series. `total` is the expected length (a
/// count taken before reading); more or fewer points are tolerated.
#[derive(Debug)]
pub struct Downsampler {
    max: usize,
    total: usize,
    buckets: usize,
    pairs: bool,
    passthrough: bool,
    seen: usize,
    bucket: usize,
    lo: Option<(usize, Point)>,
    hi: Option<(usize, Point)>,
    out: Vec<Point>,
}

impl Downsampler {
    pub fn new(total: usize, max: usize) -> Self {
        let max = max.max(1);
        let pairs = max >= 2;
        Self {
            max,
            total: total.max(1),
            buckets: if pairs { max / 2 } else { 1 },
            pairs,
            passthrough: total <= max,
            seen: 0,
            bucket: 0,
            lo: None,
            hi: None,
            out: Vec::with_capacity(total.min(max)),
        }
    }

    pub fn push(&mut self, p: Point) {
        let i = self.seen;
        self.seen += 1;
        if self.passthrough {
            self.out.push(p);
            return;
        }
        let b = ((i as u128 * self.buckets as u128) / self.total as u128) as usize;
        let b = b.min(self.buckets - 1);
        if b != self.bucket {
            self.flush();
            self.bucket = b;
        }
        if self
            .lo
            .as_ref()
            .is_none_or(|(_, lo)| cmp_values(p.value, lo.value) == Ordering::Less)
        {
            self.lo = Some((i, p.clone()));
        }
        if self
            .hi
            .as_ref()
            .is_none_or(|(_, hi)| cmp_values(p.value, hi.value) == Ordering::Greater)
        {
            self.hi = Some((i, p));
        }
    }

    fn flush(&mut self) {
        match (self.lo.take(), self.hi.take()) {
            (Some((li, lo)), Some((hi_i, hi))) => {
                if !self.pairs {
                    self.out.push(hi);
                } else if li == hi_i {
                    self.out.push(lo);
                } else if li < hi_i {
                    self.out.push(lo);
                    self.out.push(hi);
                } else {
                    self.out.push(hi);
                    self.out.push(lo);
                }
            }
            (Some((_, p)), None) | (None, Some((_, p))) => self.out.push(p),
            (None, None) => {}
        }
    }

    /// The kept points in step order, and whether any were dropped.
    pub fn finish(mut self) -> (Vec<Point>, bool) {
        self.flush();
        if self.passthrough {
            if self.out.len() <= self.max {
                return (self.out, false);
            }
            // More points arrived than were counted: reduce what we have.
            return (downsample(self.out, self.max).0, true);
        }
        (self.out, true)
    }
}

/// [`Downsampler`] over a series in memory.
pub fn downsample(points: Vec<Point>, max: usize) -> (Vec<Point>, bool) {
    let mut d = Downsampler::new(points.len(), max);
    for p in points {
        d.push(p);
    }
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(step: i64, value: f64) -> Point {
        Point {
            key: MetricKey::parse("k", "loss").unwrap(),
            step,
            ts_micros: 0,
            value,
        }
    }

    #[test]
    fn downsampling_keeps_each_buckets_extremes_and_the_bound() {
        let mut series: Vec<Point> = (0..10_000).map(|s| pt(s, (s % 7) as f64)).collect();
        series[4321].value = 1e9;
        series[8765].value = -1e9;
        series[9999].value = f64::NAN;
        let (out, down) = downsample(series, 100);
        assert!(down);
        assert!(out.len() <= 100, "{} points", out.len());
        assert!(out.windows(2).all(|w| w[0].step < w[1].step));
        assert!(out.iter().any(|p| p.value == 1e9));
        assert!(out.iter().any(|p| p.value == -1e9));
        assert!(out.iter().any(|p| p.value.is_nan()));
    }

    #[test]
    fn short_series_are_returned_whole() {
        let series: Vec<Point> = (0..10).map(|s| pt(s, s as f64)).collect();
        let (out, down) = downsample(series.clone(), 10);
        assert!(!down);
        assert_eq!(out, series);
        let (out, down) = downsample(series, 1);
        assert!(down);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, 9.0);
    }

    #[test]
    fn latest_order_is_step_then_time_then_value() {
        let a = pt(5, 1.0);
        let mut b = pt(4, 100.0);
        assert_eq!(a.cmp_latest(&b), Ordering::Greater);
        b.step = 5;
        b.ts_micros = 1;
        assert_eq!(a.cmp_latest(&b), Ordering::Less);
        assert_eq!(cmp_values(f64::NAN, f64::INFINITY), Ordering::Greater);
        assert_eq!(cmp_values(f64::NEG_INFINITY, -1e300), Ordering::Less);
    }

    #[test]
    fn value_kinds_round_trip_through_storage() {
        for v in [1.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let p = pt(0, v);
            let kind = ValueKind::parse(p.kind().as_str()).unwrap();
            let back = kind.rebuild(p.stored_value());
            assert!(back == v || (back.is_nan() && v.is_nan()));
        }
    }

    #[test]
    fn long_and_empty_keys_are_refused_by_name() {
        let err = MetricKey::parse("points[0].key", &"x".repeat(251)).unwrap_err();
        assert_eq!(err.field, "points[0].key");
        assert!(err.description.contains("251 bytes"));
        assert!(MetricKey::parse("f", "").is_err());
        assert!(MetricKey::parse("f", &"x".repeat(250)).is_ok());
    }
}
