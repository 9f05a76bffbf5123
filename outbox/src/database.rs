//! Where a service's database is: the one rule the workers and the admin CLI share.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

/// Service `service`'s database: `own_url` if given (`CHOREO_<SERVICE>_DATABASE_URL`), else database
/// `choreo_<service>` on the server of `server_url` (`DATABASE_URL`).
pub fn service_database(
    service: &str,
    own_url: Option<&str>,
    server_url: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    match own_url {
        Some(url) => PgConnectOptions::from_str(url),
        None => Ok(PgConnectOptions::from_str(server_url)?.database(&format!("choreo_{service}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_uses_its_own_url_or_its_database_on_the_server() {
        let server = "postgres://u:p@db.example:5433/postgres";
        let default = service_database("payment", None, server).expect("default");
        assert_eq!(
            (default.get_host(), default.get_port(), default.get_database()),
            ("db.example", 5433, Some("choreo_payment"))
        );
        let own = service_database("payment", Some("postgres://u:p@other:5432/pay"), server).expect("own");
        assert_eq!((own.get_host(), own.get_database()), ("other", Some("pay")));
        assert!(service_database("payment", None, "not a url").is_err());
    }
}
