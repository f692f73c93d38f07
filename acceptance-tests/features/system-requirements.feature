# The original UAT's minimum versions.  Versions compare as tuples of integers (11.0 is newer than 10.2.9).
Feature: System requirements

  Scenario: The storage, iSCSI and boot tools meet the minimum versions
    Then these components meet their minimum versions
      | component | command         | minimum |
      | Ceph      | rbd --version   | 10.2.9  |
      | dnsmasq   | dnsmasq --version | 2.66  |
      | tgt       | tgtadm --version | 1.0.63 |

  Scenario Outline: Versions are compared number by number
    Then version <found> meets minimum <minimum> is <verdict>

    Examples:
      | found   | minimum | verdict |
      | 11.0    | 10.2.9  | true    |
      | 10.2.10 | 10.2.9  | true    |
      | 10.2.9  | 10.2.9  | true    |
      | 2.7     | 2.66    | false   |
      | 1.0.5   | 1.0.63  | false   |
