//! Backend ids at full capacity, on a real data plane (the controller, no
//! daemon or namespace): a registered backend admitted in place of one
//! that leaves waits for the leaving one's id instead of failing the
//! change that removes it.

use std::net::IpAddr;

use lb::{
    config::{self, Registered},
    daemon::{controller::Controller, runtime::Runtime},
    dataplane::Dataplane,
    neighbor::Resolution,
};
use lb_tests::{Scratch, require_root};

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_registered_backend_waits_for_the_id_of_the_one_it_replaces() {
    require_root();
    let scratch = Scratch::new("capacity").unwrap();
    let text = format!(
        "[settings]\ninterfaces = ['lbt0']\nmax_backends = 2\nstate_file = '{}'\n\n\
         [[service]]\nname = 'echo'\nvip = '198.18.1.1'\nport = 7\nprotocol = 'tcp'\n\
         [[service.backend]]\naddress = '198.18.0.11'\n",
        scratch.dir.join("state.json").display()
    );
    let configured = config::parse(&text).unwrap();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let (leaving, joining) = (ip("198.18.0.12"), ip("198.18.0.13"));
    let with_registered = |address: IpAddr| {
        let mut d = configured.clone();
        let svc = d.services.get_mut("echo").unwrap();
        svc.backends.insert(address, 1);
        let r = Registered {
            draining: false,
            percent: 100,
        };
        svc.registered.insert(address, r);
        d
    };
    let dp = Dataplane::load(configured.settings.capacity).unwrap();
    let (mut ctl, _) = Controller::new(
        dp,
        with_registered(leaving),
        Runtime::default(),
        Resolution::default(),
        None,
    )
    .unwrap();
    let held = |ctl: &Controller| -> Vec<IpAddr> {
        ctl.services()["echo"].backends.keys().copied().collect()
    };
    assert_eq!(held(&ctl), [ip("198.18.0.11"), leaving]);

    // Both ids taken: the joining backend needs the leaving one's, free
    // once this change is written. The change lands; the joining one waits.
    let report = ctl.apply(with_registered(joining), false).unwrap();
    assert_eq!(report.deferred, [("echo".to_string(), joining)]);
    assert_eq!(held(&ctl), [ip("198.18.0.11")]);
    assert!(
        !ctl.desired().services["echo"]
            .backends
            .contains_key(&joining)
    );
    // The next change (the daemon makes it at once) gives it the id.
    let report = ctl.apply(with_registered(joining), false).unwrap();
    assert!(report.deferred.is_empty(), "{report:?}");
    assert_eq!(held(&ctl), [ip("198.18.0.11"), joining]);

    // An operator's backend is no registration: at full capacity, a change
    // that would need a freed id is refused whole, as before.
    let mut swapped = with_registered(joining);
    swapped
        .services
        .get_mut("echo")
        .unwrap()
        .backends
        .insert(ip("198.18.0.14"), 1);
    let e = ctl.apply(swapped, false).unwrap_err();
    assert!(format!("{e:#}").contains("no free backend id"), "{e:#}");
    assert_eq!(held(&ctl), [ip("198.18.0.11"), joining]);
}
