//! The `XFRM_MSG_NEWSA` encoder (the HZ probe's throw-away SA), checked
//! against the kernel's own layout: the NEWSA events of the Linux 6.1 corpus
//! carry the same `struct xfrm_usersa_info` and `struct xfrm_algo`.

use xfrmsync::wire::{self, Attrs, Messages, NewSa, Sender};
use xfrmsync::{Error, SaId};

mod common;

const XFRMA_ALG_CRYPT: u16 = 2;
const USERSA_INFO_LEN: usize = 224;

fn encoded(sa: &SaId, saddr: &str, cipher: &str, key: &[u8]) -> Vec<u8> {
    let new = NewSa::new(sa, saddr.parse().unwrap(), cipher, key).unwrap();
    let mut out = Vec::new();
    wire::encode_newsa(&mut out, Sender { seq: 7, port_id: 99 }, &new);
    out
}

fn crypt_attr(attrs: &[u8]) -> Vec<u8> {
    Attrs::new(attrs)
        .map(Result::unwrap)
        .find(|(kind, _)| *kind == XFRMA_ALG_CRYPT)
        .map(|(_, payload)| payload.to_vec())
        .expect("XFRMA_ALG_CRYPT present")
}

#[test]
fn newsa_decodes_as_the_sa_it_describes() {
    let sa = SaId::esp("192.0.2.2".parse().unwrap(), 0x485a);
    let out = encoded(&sa, "192.0.2.1", "ecb(cipher_null)", &[]);
    let msg = Messages::new(&out).next().unwrap().unwrap();
    assert_eq!((msg.kind, msg.seq, msg.port_id), (wire::XFRM_MSG_NEWSA, 7, 99));
    assert_eq!(msg.flags, wire::NLM_F_REQUEST | wire::NLM_F_ACK);
    let info = wire::decode_sa_message(&msg).unwrap();
    assert_eq!(info.sa, sa);
    assert_eq!(info.saddr, Some("192.0.2.1".parse().unwrap()));
    assert_eq!((info.reqid, info.mode, info.replay_window, info.flags), (0, 0, 0, 0));
    assert_eq!(info.lifetime.unwrap().packets, 0);
    let crypt = crypt_attr(&msg.payload[USERSA_INFO_LEN..]);
    assert_eq!(crypt.len(), 68, "name[64] and key length, no key");
    assert_eq!(&crypt[..17], b"ecb(cipher_null)\0");
    assert_eq!(u32::from_ne_bytes(crypt[64..68].try_into().unwrap()), 0);

    let marked = SaId::esp("fd00:9::2".parse().unwrap(), 0x4001).with_mark(7, 0xff);
    let out = encoded(&marked, "fd00:9::1", "cbc(aes)", &[0xab; 16]);
    let msg = Messages::new(&out).next().unwrap().unwrap();
    assert_eq!(wire::decode_sa_message(&msg).unwrap().sa, marked, "mark goes along");
    let crypt = crypt_attr(&msg.payload[USERSA_INFO_LEN..]);
    assert_eq!(u32::from_ne_bytes(crypt[64..68].try_into().unwrap()), 128, "key length in bits");
    assert_eq!(&crypt[68..], &[0xab; 16]);
}

#[test]
fn layout_matches_the_kernels_newsa() {
    // SA 0x1001 as `ip xfrm state add` made it and the kernel announced it.
    let captured = common::datagrams("events-sa-add.bin");
    let kernel = captured
        .iter()
        .flat_map(|d| Messages::new(d).map(Result::unwrap).collect::<Vec<_>>())
        .find(|m| m.kind == wire::XFRM_MSG_NEWSA && wire::decode_sa_message(m).unwrap().sa.spi == 0x1001)
        .expect("the corpus announces SA 0x1001");
    let kernel_info = wire::decode_sa_message(&kernel).unwrap();
    let key = [0x11; 16];
    let out = encoded(&kernel_info.sa, &kernel_info.saddr.unwrap().to_string(), "cbc(aes)", &key);
    let ours = Messages::new(&out).next().unwrap().unwrap();
    let (k, o) = (&kernel.payload[..USERSA_INFO_LEN], &ours.payload[..USERSA_INFO_LEN]);
    // xfrm_id, saddr, and xfrm_lifetime_cfg (byte and packet limits
    // XFRM_INF, no time limits): byte for byte where ip(8) put the same.
    assert_eq!(&o[56..96], &k[56..96], "id and saddr");
    assert_eq!(&o[96..160], &k[96..160], "lifetime limits");
    assert_eq!(&o[212..214], &k[212..214], "family");
    // struct xfrm_algo: name, key length in bits, key.
    let kernel_crypt = crypt_attr(&kernel.payload[USERSA_INFO_LEN..]);
    let our_crypt = crypt_attr(&ours.payload[USERSA_INFO_LEN..]);
    assert_eq!(&kernel_crypt[..64], &our_crypt[..64], "cbc(aes), NUL-padded");
    assert_eq!(kernel_crypt.len(), our_crypt.len());
    assert_eq!(kernel_crypt[64..68], our_crypt[64..68]);
}

#[test]
fn what_the_kernels_structures_cannot_hold_is_refused() {
    let sa = SaId::esp("192.0.2.2".parse().unwrap(), 1);
    let v4 = "192.0.2.1".parse().unwrap();
    let long = "x".repeat(64);
    for refused in [
        NewSa::new(&sa, v4, &long, &[]).err(),
        NewSa::new(&sa, v4, "ecb\0(cipher_null)", &[]).err(),
        NewSa::new(&sa, v4, "cbc(aes)", &[0; 65]).err(),
        NewSa::new(&sa, "fd00::1".parse().unwrap(), "cbc(aes)", &[]).err(),
    ] {
        assert!(matches!(refused, Some(Error::InvalidArgument(_))), "{refused:?}");
    }
    assert!(NewSa::new(&sa, v4, &long[..63], &[0; 64]).is_ok());
}
