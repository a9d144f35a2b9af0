//! The embedded default calibration corpus, so `awq quantize` works with no network and no
//! `--calib`. Every document was written for this project and is released with it under
//! Apache-2.0 (see `corpus/README.md`). Hand-written documents live in `corpus/*.txt`, one
//! category per file, separated by a line holding only `%%%` (documents may contain blank lines,
//! so the `.txt` blank-line rule cannot be used). A seeded generator adds numeric documents —
//! tables, logs, records, worked arithmetic — whose digits and layout the prose lacks.

use super::SplitMix64;

/// `(category, file contents)` in a fixed order: the corpus is the same on every machine.
const FILES: [(&str, &str); 6] = [
    ("prose", include_str!("../../corpus/prose.txt")),
    ("dialogue", include_str!("../../corpus/dialogue.txt")),
    ("techdocs", include_str!("../../corpus/techdocs.txt")),
    ("code", include_str!("../../corpus/code.txt")),
    ("math", include_str!("../../corpus/math.txt")),
    (
        "multilingual",
        include_str!("../../corpus/multilingual.txt"),
    ),
];

/// The separator line between documents in `corpus/*.txt`.
const SEPARATOR: &str = "%%%";

/// How many documents the generator adds.
const GENERATED: usize = 36;

/// Every document of the corpus with its category, in a fixed order.
pub fn documents() -> Vec<(&'static str, String)> {
    let mut docs = Vec::new();
    for (category, text) in FILES {
        docs.extend(split(text).into_iter().map(|d| (category, d.to_string())));
    }
    docs.extend((0..GENERATED).map(|i| ("generated", generated(i))));
    docs
}

fn split(text: &str) -> Vec<&str> {
    text.split(&format!("\n{SEPARATOR}\n"))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect()
}

/// Generated document `i`: one of six kinds, its numbers drawn from a generator seeded by `i`.
fn generated(i: usize) -> String {
    let mut rng = SplitMix64::new(0xA11C_0000 + i as u64);
    match i % 6 {
        0 => weather_log(&mut rng, i),
        1 => sales_csv(&mut rng),
        2 => json_records(&mut rng),
        3 => long_multiplication(&mut rng),
        4 => timetable(&mut rng, i),
        _ => server_log(&mut rng),
    }
}

const TOWNS: [&str; 12] = [
    "Aberdeen", "Bergen", "Cork", "Dresden", "Evora", "Graz", "Lyon", "Malmo", "Nantes", "Porto",
    "Tartu", "Utrecht",
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

fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

/// Uniform in `lo..hi` with one decimal.
fn tenths(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    let steps = ((hi - lo) * 10.0) as u64;
    lo + rng.below(steps) as f64 / 10.0
}

fn weather_log(rng: &mut SplitMix64, i: usize) -> String {
    let town = pick(rng, &TOWNS);
    let month = MONTHS[i % 12];
    let base = 2.0 + 18.0 * ((i % 12) as f64 / 11.0 * std::f64::consts::PI).sin();
    let mut s = format!(
        "Daily observations, {town} weather station, {month}\n\n\
         | Day | Min °C | Max °C | Rain mm | Wind km/h | Sky |\n|-----|--------|--------|---------|-----------|-----|\n"
    );
    let (mut rain_total, mut max_hi) = (0.0, f64::MIN);
    for day in 1..=8 {
        let lo = base + tenths(rng, -6.0, 3.0);
        let hi = lo + tenths(rng, 2.0, 11.0);
        let rain = if rng.below(3) == 0 {
            tenths(rng, 0.1, 24.0)
        } else {
            0.0
        };
        let wind = 5 + rng.below(45);
        let sky = pick(
            rng,
            &["clear", "cloudy", "overcast", "showers", "fog", "sunny"],
        );
        rain_total += rain;
        max_hi = max_hi.max(hi);
        s += &format!("| {day} | {lo:.1} | {hi:.1} | {rain:.1} | {wind} | {sky} |\n");
    }
    s += &format!(
        "\nTotal rainfall over the eight days: {rain_total:.1} mm. Highest temperature: {max_hi:.1} °C."
    );
    s
}

fn sales_csv(rng: &mut SplitMix64) -> String {
    let products = [
        ("notebook A5", 3.49),
        ("ballpoint pen", 0.89),
        ("desk lamp", 24.90),
        ("stapler", 7.25),
        ("paper 500 sheets", 5.60),
        ("marker set", 4.15),
        ("calculator", 12.99),
        ("ruler 30 cm", 1.20),
    ];
    let mut s = String::from("order_id,date,store,product,quantity,unit_price,total\n");
    let mut grand = 0.0;
    for n in 0..9 {
        let (p, price) = products[rng.below(products.len() as u64) as usize];
        let q = 1 + rng.below(12);
        let total = q as f64 * price;
        grand += total;
        s += &format!(
            "{},2026-{:02}-{:02},{},{p},{q},{price:.2},{total:.2}\n",
            10_400 + rng.below(900) + n,
            1 + rng.below(12),
            1 + rng.below(28),
            pick(rng, &TOWNS),
        );
    }
    s += &format!("# 9 rows, grand total {grand:.2} EUR");
    s
}

fn json_records(rng: &mut SplitMix64) -> String {
    let first = [
        "Amara", "Bruno", "Chen", "Dana", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    ];
    let roles = ["engineer", "designer", "analyst", "manager", "technician"];
    let mut s = String::from("[\n");
    for n in 0..4 {
        let name = pick(rng, &first);
        s += &format!(
            "  {{\"id\": {}, \"name\": \"{name}\", \"role\": \"{}\", \"city\": \"{}\", \"active\": {}, \"score\": {:.2}, \"tags\": [\"{}\", \"{}\"]}}{}\n",
            1000 + rng.below(9000),
            pick(rng, &roles),
            pick(rng, &TOWNS),
            rng.below(4) != 0,
            rng.below(10_000) as f64 / 100.0,
            pick(rng, &["remote", "onsite", "hybrid"]),
            pick(rng, &["team-a", "team-b", "team-c", "ops"]),
            if n < 3 { "," } else { "" },
        );
    }
    s.push(']');
    s
}

fn long_multiplication(rng: &mut SplitMix64) -> String {
    let a = 100 + rng.below(9900);
    let b = 11 + rng.below(989);
    let mut s = format!("Worked example: multiply {a} by {b}.\n\n");
    let mut place = 1u64;
    let mut rest = b;
    let mut partials = Vec::new();
    while rest > 0 {
        let digit = rest % 10;
        let p = a * digit * place;
        s += &format!("{a} × {digit} × {place} = {p}\n");
        partials.push(p.to_string());
        rest /= 10;
        place *= 10;
    }
    s += &format!(
        "\nAdd the partial products: {} = {}.\nCheck by division: {} ÷ {b} = {a}.\n",
        partials.join(" + "),
        a * b,
        a * b
    );
    let (q, r) = (a / (b % 97 + 3), a % (b % 97 + 3));
    s += &format!(
        "\nAnd a division with remainder: {a} ÷ {} = {q} remainder {r}, because {} × {q} + {r} = {a}.",
        b % 97 + 3,
        b % 97 + 3
    );
    s
}

fn timetable(rng: &mut SplitMix64, i: usize) -> String {
    let from = TOWNS[i % 12];
    let to = TOWNS[(i + 5) % 12];
    let mut s = format!(
        "Timetable: {from} → {to} (weekdays)\n\n| Train | Departs | Arrives | Duration | Changes | Platform |\n|---|---|---|---|---|---|\n"
    );
    let mut t = 5 * 60 + rng.below(60);
    for n in 0..7 {
        let dur = 55 + rng.below(90);
        let arr = t + dur;
        s += &format!(
            "| {}{} | {:02}:{:02} | {:02}:{:02} | {}h{:02} | {} | {} |\n",
            pick(rng, &["IC", "RE", "EX"]),
            200 + n * 2 + i,
            t / 60,
            t % 60,
            (arr / 60) % 24,
            arr % 60,
            dur / 60,
            dur % 60,
            rng.below(3),
            1 + rng.below(9),
        );
        t += 40 + rng.below(60);
    }
    s += "\nReservations are recommended on EX services. Bicycles travel free outside peak hours.";
    s
}

fn server_log(rng: &mut SplitMix64) -> String {
    let paths = [
        "/api/v1/users",
        "/api/v1/orders",
        "/static/app.js",
        "/login",
        "/healthz",
        "/api/v1/search?q=lamp",
    ];
    let mut s = String::new();
    let (mut h, mut m, mut sec) = (8 + rng.below(10), rng.below(60), rng.below(60));
    for _ in 0..8 {
        sec += 1 + rng.below(20);
        m += sec / 60;
        sec %= 60;
        h += m / 60;
        m %= 60;
        let status = match rng.below(20) {
            0 => 500,
            1 | 2 => 404,
            3 => 302,
            _ => 200,
        };
        s += &format!(
            "2026-06-{:02}T{h:02}:{m:02}:{sec:02}Z {} 10.0.{}.{} {} {} {status} {}ms {}B\n",
            1 + rng.below(28),
            if status >= 500 { "ERROR" } else { "INFO " },
            rng.below(256),
            rng.below(256),
            pick(rng, &["GET", "GET", "GET", "POST"]),
            pick(rng, &paths),
            1 + rng.below(900),
            100 + rng.below(40_000),
        );
    }
    s.pop();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_fixed_and_covers_every_category() {
        let docs = documents();
        assert_eq!(docs.len(), documents().len());
        assert!(docs.len() >= 150, "{} documents", docs.len());
        for (cat, _) in FILES {
            assert!(docs.iter().filter(|d| d.0 == cat).count() >= 10, "{cat}");
        }
        assert!(docs.iter().all(|(_, d)| !d.contains("\n%%%\n")));
        // The generator is seeded: same text every time.
        assert_eq!(generated(7), generated(7));
        assert_ne!(generated(0), generated(6));
    }
}
