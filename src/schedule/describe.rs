//! Human words for a cron expression, shown beside the raw one (`"0 30 16 * * Mon-Fri"` →
//! `"at 16:30, Monday through Friday"`): the tasks API's `schedule_description` and the
//! dashboard.
//!
//! A small describer for the common shapes (a fixed time of day, every n seconds, minutes
//! or hours, restricted to days of the week, a day of the month or a month); anything
//! else is `None`, and the caller shows the raw expression. It reads the text only: the
//! expression has already been compiled by [`super::Schedule::parse`].

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A description of `expr` (5 or 6 fields, or an `@` alias), or `None` for a shape it
/// does not know.
pub fn describe(expr: &str) -> Option<String> {
    let expr = expr.trim();
    let alias = match expr.to_ascii_lowercase().as_str() {
        "@hourly" => Some("0 0 * * * *"),
        "@daily" | "@midnight" => Some("0 0 0 * * *"),
        "@weekly" => Some("0 0 0 * * Sun"),
        "@monthly" => Some("0 0 0 1 * *"),
        "@yearly" | "@annually" => Some("0 0 0 1 Jan *"),
        _ => None,
    };
    let fields: Vec<&str> = alias.unwrap_or(expr).split_whitespace().collect();
    let (second, minute, hour, dom, month, dow) = match fields.as_slice() {
        [m, h, dom, mon, dow] => ("0", *m, *h, *dom, *mon, *dow),
        [s, m, h, dom, mon, dow] => (*s, *m, *h, *dom, *mon, *dow),
        _ => return None,
    };
    let time = describe_time(second, minute, hour)?;
    let days = describe_days(dom, month, dow)?;
    Some(match (days.is_empty(), time.starts_with("at ")) {
        (true, true) => format!("{time}, every day"),
        (true, false) => time,
        (false, _) => format!("{time}, {days}"),
    })
}

fn any(field: &str) -> bool {
    field == "*" || field == "?"
}

fn number(field: &str, max: u32) -> Option<u32> {
    field.parse::<u32>().ok().filter(|n| *n <= max)
}

/// `*/n` (or `0/n`) → `n`.
fn step(field: &str) -> Option<u32> {
    let (start, every) = field.split_once('/')?;
    if start != "*" && start != "0" {
        return None;
    }
    every.parse::<u32>().ok().filter(|n| *n > 0)
}

fn plural(n: u32, unit: &str) -> String {
    if n == 1 {
        format!("every {unit}")
    } else {
        format!("every {n} {unit}s")
    }
}

fn describe_time(second: &str, minute: &str, hour: &str) -> Option<String> {
    let s = number(second, 59);
    let m = number(minute, 59);
    if let (Some(s), Some(m)) = (s, m) {
        let clock = |h: u32| {
            if s == 0 {
                format!("{h:02}:{m:02}")
            } else {
                format!("{h:02}:{m:02}:{s:02}")
            }
        };
        if let Some(h) = number(hour, 23) {
            return Some(format!("at {}", clock(h)));
        }
        if hour.contains(',') && !hour.contains(['-', '/']) {
            let hours = hour
                .split(',')
                .map(|h| number(h, 23).map(clock))
                .collect::<Option<Vec<_>>>()?;
            return Some(format!("at {}", join(&hours)));
        }
        let past = if s == 0 {
            format!("at minute {m}")
        } else {
            format!("at {m:02}:{s:02} past the hour")
        };
        if any(hour) {
            return Some(format!("every hour, {past}"));
        }
        return step(hour).map(|n| format!("{}, {past}", plural(n, "hour")));
    }
    if !any(hour) {
        return None;
    }
    match (s, any(minute), step(minute)) {
        (Some(0), true, _) => Some("every minute".into()),
        (Some(0), false, Some(n)) => Some(plural(n, "minute")),
        _ if any(minute) && any(second) => Some("every second".into()),
        _ if any(minute) => step(second).map(|n| plural(n, "second")),
        _ => None,
    }
}

fn join(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// 0–7 (0 and 7 are Sunday) or a three-letter name.
fn weekday(text: &str) -> Option<usize> {
    if let Ok(n) = text.parse::<usize>() {
        return (n <= 7).then_some(n % 7);
    }
    DAYS.iter().position(|d| d[..3].eq_ignore_ascii_case(text))
}

fn month_of(text: &str) -> Option<usize> {
    if let Ok(n) = text.parse::<usize>() {
        return (1..=12).contains(&n).then(|| n - 1);
    }
    MONTHS
        .iter()
        .position(|m| m[..3].eq_ignore_ascii_case(text))
}

fn describe_weekdays(dow: &str) -> Option<String> {
    let parts = dow
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((from, to)) => Some(format!(
                "{} through {}",
                DAYS[weekday(from)?],
                DAYS[weekday(to)?]
            )),
            None => weekday(part).map(|d| DAYS[d].to_string()),
        })
        .collect::<Option<Vec<_>>>()?;
    let ranges = parts.iter().any(|p| p.contains(" through "));
    Some(if ranges {
        join(&parts)
    } else {
        format!("on {}", join(&parts))
    })
}

fn describe_days(dom: &str, month: &str, dow: &str) -> Option<String> {
    let mut words = Vec::new();
    match (any(dom), any(dow)) {
        (true, true) => {}
        (true, false) => words.push(describe_weekdays(dow)?),
        (false, true) => words.push(format!("on day {} of the month", number(dom, 31)?)),
        (false, false) => return None,
    }
    if !any(month) {
        let month = MONTHS[month_of(month)?];
        match words.pop() {
            Some(day) if day.starts_with("on day ") => words.push(format!(
                "on {} {month}",
                &day["on day ".len()..day.len() - " of the month".len()]
            )),
            Some(day) => words.push(format!("{day}, in {month}")),
            None => words.push(format!("every day in {month}")),
        }
    }
    Some(words.join(", "))
}

#[cfg(test)]
mod tests {
    use super::describe;

    fn says(expr: &str) -> String {
        describe(expr).unwrap_or_else(|| format!("<raw {expr}>"))
    }

    #[test]
    fn every_schedule_of_the_shipped_config_reads_as_words() {
        assert_eq!(says("0 * * * * *"), "every minute");
        assert_eq!(says("0 */15 * * * *"), "every 15 minutes");
        assert_eq!(
            says("0 30 16 * * Mon-Fri"),
            "at 16:30, Monday through Friday"
        );
        assert_eq!(says("0 0 2 * * Sun"), "at 02:00, on Sunday");
        assert_eq!(
            says("0 0 18 * * Mon-Fri"),
            "at 18:00, Monday through Friday"
        );
        assert_eq!(says("0 0 0 * * *"), "at 00:00, every day");
        assert_eq!(says("0 30 0 * * *"), "at 00:30, every day");
    }

    #[test]
    fn five_field_expressions_have_no_seconds() {
        assert_eq!(says("30 16 * * 1-5"), "at 16:30, Monday through Friday");
        assert_eq!(says("*/5 * * * *"), "every 5 minutes");
        assert_eq!(says("0 9 * * 0,6"), "at 09:00, on Sunday and Saturday");
        assert_eq!(says("0 9 * * 7"), "at 09:00, on Sunday");
    }

    #[test]
    fn seconds_steps_hours_and_lists_are_described() {
        assert_eq!(says("*/10 * * * * *"), "every 10 seconds");
        assert_eq!(says("* * * * * *"), "every second");
        assert_eq!(says("15 30 16 * * *"), "at 16:30:15, every day");
        assert_eq!(says("0 5 * * * *"), "every hour, at minute 5");
        assert_eq!(says("0 0 */6 * * *"), "every 6 hours, at minute 0");
        assert_eq!(
            says("0 0 9,13,17 * * *"),
            "at 09:00, 13:00 and 17:00, every day"
        );
        assert_eq!(
            says("0 0 1 * * Mon,Wed,Fri"),
            "at 01:00, on Monday, Wednesday and Friday"
        );
    }

    #[test]
    fn days_of_the_month_months_and_aliases_are_described() {
        assert_eq!(says("0 0 3 1 * *"), "at 03:00, on day 1 of the month");
        assert_eq!(says("0 0 3 15 Mar *"), "at 03:00, on 15 March");
        assert_eq!(says("0 0 3 * 12 Mon"), "at 03:00, on Monday, in December");
        assert_eq!(says("@daily"), "at 00:00, every day");
        assert_eq!(says("@hourly"), "every hour, at minute 0");
        assert_eq!(says("@weekly"), "at 00:00, on Sunday");
        assert_eq!(says("@yearly"), "at 00:00, on 1 January");
    }

    #[test]
    fn shapes_it_does_not_know_are_left_to_the_raw_expression() {
        for expr in [
            "0 0 3 1 * Mon",     // day of month and day of week at once
            "0 0 3 L * *",       // last day of the month
            "0 0 3 * * 5#3",     // third Friday
            "0 0-30/10 9 * * *", // a stepped range of minutes
            "0 0 9-17 * * *",    // a range of hours
            "0 0 0 1 1 * 2030",  // seven fields
            "garbage",
        ] {
            assert_eq!(describe(expr), None, "{expr}");
        }
    }
}
