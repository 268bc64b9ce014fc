//! Crontab schedules (Faust's `@app.crontab`): when each run of [`App::crontab`] is due.
//!
//! The format is croniter's, which Faust uses: five fields — minute, hour, day of month,
//! month, day of week — and an optional sixth, seconds (last, as croniter reads it). A field
//! is `*`, a number, a range `a-b`, a step `*/n`, `a-b/n` or `a/n`, or a list of those
//! separated by commas; months and days of the week may be named (`JAN`, `MON`), Sunday is 0
//! or 7. When both the day of month and the day of week are restricted, a day matching either
//! fires (as in Vixie cron and croniter). `@yearly`, `@monthly`, `@weekly`, `@daily`,
//! `@midnight` and `@hourly` stand for their usual schedules.
//!
//! Times are civil times in a time zone (UTC unless one is given, or Faust's `timezone`
//! setting): `0 9 * * MON-FRI` in `Europe/Paris` fires at 9:00 in Paris whatever the season.
//! A time skipped by a daylight-saving change fires at the first instant after the gap; a
//! time repeated by one fires once.
//!
//! [`App::crontab`]: crate::App::crontab

use std::time::SystemTime;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;

/// Why a crontab or its time zone was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CronError {
    /// The expression cannot be read.
    #[error("crontab `{spec}`: {reason}")]
    Invalid {
        /// The expression.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The expression is valid but no date matches it (such as the 30th of February).
    #[error("crontab `{spec}` never fires (no date within 30 years matches it)")]
    NeverFires {
        /// The expression.
        spec: String,
    },
    /// The time zone is not in the time zone database.
    #[error("unknown time zone `{name}`: {reason}")]
    UnknownTimeZone {
        /// The name given.
        name: String,
        /// The database's answer.
        reason: String,
    },
}

/// A crontab schedule, for [`App::crontab`](crate::App::crontab).
///
/// ```
/// use faust::Crontab;
///
/// // Every weekday at 9:00 in Paris, on one worker of the app.
/// let report = Crontab::parse("0 9 * * MON-FRI")?.in_time_zone("Europe/Paris")?.on_leader();
/// assert_eq!(report.to_string(), "0 9 * * MON-FRI");
/// # Ok::<(), faust::CronError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Crontab {
    spec: String,
    seconds: u64,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// The day-of-month field starts with `*` (then only the day of week restricts days).
    any_day: bool,
    /// The day-of-week field starts with `*`.
    any_weekday: bool,
    time_zone: Option<TimeZone>,
    on_leader: bool,
}

impl std::fmt::Display for Crontab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)
    }
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// How far ahead a schedule is searched: a leap day of a given weekday comes back within 28
/// years.
const HORIZON_YEARS: i16 = 30;

impl Crontab {
    /// Reads a crontab expression (see the module's documentation for the format).
    pub fn parse(spec: &str) -> Result<Crontab, CronError> {
        let invalid = |reason: String| CronError::Invalid { spec: spec.to_string(), reason };
        let expanded = match spec.trim().to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            other if other.starts_with('@') => return Err(invalid(format!("unknown nickname `{other}`"))),
            _ => spec.trim().to_string(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if !(5..=6).contains(&fields.len()) {
            return Err(invalid(format!(
                "{} fields; expected 5 (minute hour day month weekday) or 6 (and seconds)",
                fields.len()
            )));
        }
        let field = |i: usize, name: &str, min: u32, max: u32, names: &[&str]| {
            parse_field(fields[i], min, max, names)
                .map_err(|reason| invalid(format!("{name} field `{}`: {reason}", fields[i])))
        };
        let minutes = field(0, "minute", 0, 59, &[])?;
        let hours = field(1, "hour", 0, 23, &[])?;
        let days = field(2, "day-of-month", 1, 31, &[])?;
        let months = field(3, "month", 1, 12, &MONTHS)?;
        // 7 is Sunday too.
        let weekdays_0_7 = field(4, "day-of-week", 0, 7, &WEEKDAYS)?;
        let weekdays = ((weekdays_0_7 | (weekdays_0_7 >> 7)) & 0x7f) as u8;
        let seconds = if fields.len() == 6 { field(5, "second", 0, 59, &[])? } else { 1 };
        let crontab = Crontab {
            spec: spec.trim().to_string(),
            seconds,
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays,
            any_day: fields[2].starts_with('*') || fields[2] == "?",
            any_weekday: fields[4].starts_with('*') || fields[4] == "?",
            time_zone: None,
            on_leader: false,
        };
        // A schedule that can never fire is a mistake to report now, not a silent timer.
        if crontab.next_in(&TimeZone::UTC, SystemTime::UNIX_EPOCH).is_none() {
            return Err(CronError::NeverFires { spec: crontab.spec });
        }
        Ok(crontab)
    }

    /// The same schedule in the time zone `name` (an IANA name such as `Europe/Paris`, or
    /// `UTC`), instead of the app's `timezone` setting.
    pub fn in_time_zone(mut self, name: &str) -> Result<Crontab, CronError> {
        self.time_zone = Some(time_zone(name)?);
        Ok(self)
    }

    /// Runs only on the app's leader (Faust's `on_leader=True`): one worker of the app, the
    /// one holding its leader topic's partition (see [`App::is_leader`](crate::App::is_leader)).
    pub fn on_leader(mut self) -> Crontab {
        self.on_leader = true;
        self
    }

    /// Whether this schedule runs on the leader only.
    pub fn is_on_leader(&self) -> bool {
        self.on_leader
    }

    /// The first time after `after` the schedule fires, in its time zone (UTC when none was
    /// given); `None` when no date within 30 years matches.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        self.next_in(self.time_zone.as_ref().unwrap_or(&TimeZone::UTC), after)
    }

    /// The time zone given with [`in_time_zone`](Crontab::in_time_zone), if any.
    pub(crate) fn time_zone(&self) -> Option<&TimeZone> {
        self.time_zone.as_ref()
    }

    /// [`next_after`](Crontab::next_after) in `tz`.
    pub(crate) fn next_in(&self, tz: &TimeZone, after: SystemTime) -> Option<SystemTime> {
        let after = jiff::Timestamp::try_from(after).ok()?;
        // The first whole second after `after`, as a civil time in `tz`.
        let mut from = tz
            .to_datetime(after)
            .with()
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(jiff::SignedDuration::from_secs(1))
            .ok()?;
        loop {
            let civil = self.next_civil(from)?;
            let zoned = tz.to_ambiguous_zoned(civil).compatible().ok()?;
            if zoned.timestamp() > after {
                return Some(SystemTime::from(zoned.timestamp()));
            }
            // A time repeated by a daylight-saving change, already passed on its first showing.
            from = civil.checked_add(jiff::SignedDuration::from_secs(1)).ok()?;
        }
    }

    fn day_matches(&self, year: i16, month: i8, day: i8) -> bool {
        let in_days = self.days & (1 << day) != 0;
        let weekday =
            jiff::civil::Date::new(year, month, day).map(|d| d.weekday().to_sunday_zero_offset()).unwrap_or_default();
        let in_weekdays = self.weekdays & (1 << weekday) != 0;
        match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (false, true) => in_days,
            (true, false) => in_weekdays,
            (false, false) => in_days || in_weekdays,
        }
    }

    /// The first civil time at or after `from` that the fields match.
    fn next_civil(&self, from: DateTime) -> Option<DateTime> {
        let (mut year, mut month, mut day) = (from.year(), from.month(), from.day());
        let (mut hour, mut minute, mut second) = (from.hour(), from.minute(), from.second());
        let last_year = year.saturating_add(HORIZON_YEARS);
        loop {
            // Carries first: each check below only ever moves one field on.
            if second > 59 {
                (second, minute) = (0, minute + 1);
            }
            if minute > 59 {
                (minute, hour) = (0, hour + 1);
            }
            if hour > 23 {
                (hour, day) = (0, day + 1);
            }
            if day > days_in_month(year, month) {
                (day, month) = (1, month + 1);
            }
            if month > 12 {
                (month, year) = (1, year + 1);
            }
            if year > last_year {
                return None;
            }
            if self.months & (1 << month) == 0 {
                (month, day, hour, minute, second) = (month + 1, 1, 0, 0, 0);
            } else if !self.day_matches(year, month, day) {
                (day, hour, minute, second) = (day + 1, 0, 0, 0);
            } else if self.hours & (1 << hour) == 0 {
                (hour, minute, second) = (hour + 1, 0, 0);
            } else if self.minutes & (1 << minute) == 0 {
                (minute, second) = (minute + 1, 0);
            } else if self.seconds & (1 << second) == 0 {
                second += 1;
            } else {
                return DateTime::new(year, month, day, hour, minute, second, 0).ok();
            }
        }
    }
}

/// The time zone named `name` in the system's database (or the one built in, where the
/// system has none).
pub(crate) fn time_zone(name: &str) -> Result<TimeZone, CronError> {
    TimeZone::get(name).map_err(|e| CronError::UnknownTimeZone { name: name.to_string(), reason: e.to_string() })
}

fn days_in_month(year: i16, month: i8) -> i8 {
    jiff::civil::Date::new(year, month.clamp(1, 12), 1).map_or(31, |d| d.days_in_month())
}

/// One field as a bit set over `min..=max`.
fn parse_field(text: &str, min: u32, max: u32, names: &[&str]) -> Result<u64, String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            // Months are named from 1, days of the week from 0.
            return Ok(i as u32 + min);
        }
        let n: u32 = s
            .parse()
            .map_err(|_| format!("`{s}` is not a number{}", if names.is_empty() { "" } else { " or a name" }))?;
        if !(min..=max).contains(&n) {
            return Err(format!("{n} is outside {min}-{max}"));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step.parse().map_err(|_| format!("step `{step}` is not a number"))?;
                if step == 0 {
                    return Err("a step of 0".to_string());
                }
                (range, step)
            }
            None => (item, 1),
        };
        let (low, high) = match range {
            "*" | "?" => (min, max),
            _ => match range.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                // `a/n` runs from `a` to the end of the range, as croniter reads it.
                None if step > 1 || item.contains('/') => (value(range)?, max),
                None => {
                    let v = value(range)?;
                    (v, v)
                }
            },
        };
        if low > high {
            return Err(format!("the range {low}-{high} runs backwards"));
        }
        bits |= (low..=high).step_by(step as usize).fold(0u64, |acc, v| acc | (1 << v));
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(s: &str) -> SystemTime {
        SystemTime::from(s.parse::<jiff::Timestamp>().unwrap())
    }

    fn next(spec: &str, tz: Option<&str>, after: &str) -> String {
        let mut c = Crontab::parse(spec).unwrap();
        if let Some(tz) = tz {
            c = c.in_time_zone(tz).unwrap();
        }
        jiff::Timestamp::try_from(c.next_after(at(after)).unwrap()).unwrap().to_string()
    }

    #[test]
    fn fields_steps_ranges_lists_and_names() {
        assert_eq!(next("*/15 * * * *", None, "2026-03-01T10:07:30Z"), "2026-03-01T10:15:00Z");
        assert_eq!(next("*/15 * * * *", None, "2026-03-01T10:45:00Z"), "2026-03-01T11:00:00Z");
        assert_eq!(
            next("0 9 * * MON-FRI", None, "2026-12-04T09:00:00Z"),
            "2026-12-07T09:00:00Z",
            "Friday 9:00 → Monday"
        );
        assert_eq!(next("30 4 1,15 * *", None, "2026-01-02T00:00:00Z"), "2026-01-15T04:30:00Z");
        assert_eq!(next("0 0 1 jan *", None, "2026-06-01T00:00:00Z"), "2027-01-01T00:00:00Z");
        assert_eq!(next("0 12 * * 7", None, "2026-12-03T00:00:00Z"), "2026-12-06T12:00:00Z", "7 is Sunday");
        assert_eq!(next("5/20 * * * *", None, "2026-01-01T00:06:00Z"), "2026-01-01T00:25:00Z");
        assert_eq!(next("@hourly", None, "2026-01-01T00:00:00Z"), "2026-01-01T01:00:00Z");
        assert_eq!(next("@daily", None, "2026-01-01T12:00:00Z"), "2026-01-02T00:00:00Z");
        // Seconds, croniter's sixth field.
        assert_eq!(next("* * * * * */10", None, "2026-01-01T00:00:05.5Z"), "2026-01-01T00:00:10Z");
        assert_eq!(next("* * * * * 0", None, "2026-01-01T00:00:00Z"), "2026-01-01T00:01:00Z");
    }

    #[test]
    fn a_restricted_day_and_weekday_fire_on_either() {
        // The 13th, or any Friday: Friday 2026-12-04 comes before the 13th.
        assert_eq!(next("0 0 13 * FRI", None, "2026-12-01T00:00:00Z"), "2026-12-04T00:00:00Z");
        assert_eq!(next("0 0 13 * FRI", None, "2026-12-11T00:00:00Z"), "2026-12-13T00:00:00Z");
        // A step on the day of month still counts as `*` (Vixie cron's reading).
        assert_eq!(next("0 0 */2 * MON", None, "2026-12-01T00:00:00Z"), "2026-12-07T00:00:00Z");
    }

    #[test]
    fn leap_days_and_month_lengths() {
        assert_eq!(next("0 0 29 2 *", None, "2026-03-01T00:00:00Z"), "2028-02-29T00:00:00Z");
        assert_eq!(next("0 0 31 * *", None, "2026-04-01T00:00:00Z"), "2026-05-31T00:00:00Z");
        assert!(matches!(Crontab::parse("0 0 30 2 *"), Err(CronError::NeverFires { .. })));
    }

    #[test]
    fn civil_time_in_a_zone_across_daylight_saving_changes() {
        // 9:00 in Paris is 8:00 UTC in winter, 7:00 UTC in summer.
        assert_eq!(next("0 9 * * *", Some("Europe/Paris"), "2026-01-10T12:00:00Z"), "2026-01-11T08:00:00Z");
        assert_eq!(next("0 9 * * *", Some("Europe/Paris"), "2026-07-10T12:00:00Z"), "2026-07-11T07:00:00Z");
        // 2:30 does not exist on 2026-03-29 in Paris (2:00 → 3:00): it fires at 3:30 local.
        assert_eq!(next("30 2 * * *", Some("Europe/Paris"), "2026-03-28T12:00:00Z"), "2026-03-29T01:30:00Z");
        // 2:30 happens twice on 2026-10-25 (3:00 → 2:00): it fires once, at the first.
        let first = next("30 2 * * *", Some("Europe/Paris"), "2026-10-24T12:00:00Z");
        assert_eq!(first, "2026-10-25T00:30:00Z");
        assert_eq!(next("30 2 * * *", Some("Europe/Paris"), &first), "2026-10-26T01:30:00Z");
    }

    #[test]
    fn bad_expressions_and_zones_are_named() {
        for (spec, says) in [
            ("* * * *", "4 fields"),
            ("60 * * * *", "minute field `60`: 60 is outside 0-59"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "1-31"),
            ("* * * 13 *", "month field"),
            ("* * * * funday", "not a number or a name"),
            ("*/0 * * * *", "a step of 0"),
            ("5-1 * * * *", "runs backwards"),
            ("@fortnightly", "unknown nickname"),
        ] {
            let e = Crontab::parse(spec).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(spec), "{spec}: {e}");
        }
        let e = Crontab::parse("* * * * *").unwrap().in_time_zone("Mars/Olympus_Mons").unwrap_err();
        assert!(matches!(e, CronError::UnknownTimeZone { .. }), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The next time matches the fields and nothing in between does: checked minute by
        /// minute against a direct reading of the fields.
        #[test]
        fn the_next_time_is_the_first_matching_minute(
            minute in 0u32..60, step in 1u32..30, hours in proptest::collection::vec(0u32..24, 1..4),
            weekday in 0u32..7, start in 1_700_000_000u64..1_900_000_000u64,
        ) {
            let hours: Vec<String> = hours.iter().map(u32::to_string).collect();
            let spec = format!("{minute}/{step} {} * * {weekday}", hours.join(","));
            let c = Crontab::parse(&spec).unwrap();
            let after = SystemTime::UNIX_EPOCH + Duration::from_secs(start);
            let found = c.next_after(after).unwrap();
            let matches = |t: SystemTime| {
                let dt = TimeZone::UTC.to_datetime(jiff::Timestamp::try_from(t).unwrap());
                let m = dt.minute() as u32;
                dt.second() == 0 && m >= minute && (m - minute).is_multiple_of(step)
                    && hours.contains(&dt.hour().to_string())
                    && dt.date().weekday().to_sunday_zero_offset() as u32 == weekday
            };
            proptest::prop_assert!(matches(found), "{spec}: {found:?}");
            let mut t = after + Duration::from_secs(60 - start % 60);
            while t < found {
                proptest::prop_assert!(!matches(t), "{spec}: {t:?} matches before {found:?}");
                t += Duration::from_secs(60);
            }
        }
    }
}
